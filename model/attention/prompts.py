"""Prompt templates and expression preprocessing (SPEC §2.1, §4.1–§4.4, §4.8).

The template strings are experimental inputs and are kept byte for byte as SPEC §4.2–§4.3 gives them (as JSON
string literals, which read the same in Python). Index = prompt version (0 = the paper's default).
"""
from __future__ import annotations

from model.utils.errors import DecafError, SettingError

#: greedy decoding length of every answer (SPEC §4.7); lower only for smoke tests of random-weight models, where it
#: can change obj_name
MAX_NEW_TOKENS = 128
#: the prompt versions of §4.3 (0 = the paper's default; paper Tables 10–12)
PROMPT_VERSIONS = (0, 1, 2, 3)

# OBJ_CLS (calls 1–2), versions 0–3 (§4.2, §4.3; paper Table 10)
OBJ_CLS: tuple[str, ...] = (
    "{sent} \nWhat is the main object (or objects) referred to in the given expression or question? \nFocus on the **primary subject or agent** involved in the described action or behavior. Respond with a single word (e.g., 'cat', 'person', 'dog') that best describes the target object(s). ",
    "{sent} \nIdentify the primary object referred to in the expression and answer with a single word. \n",
    "{sent} \nIdentify the primary object referred to in the expression. \nFocus on the **primary subject or agent** involved in the described action or behavior. Respond with a single word (e.g., 'cat', 'person', 'dog') that best describes the target object(s). ",
    "{sent} \nDetermine the primary subject or agent mentioned in the expression or question, and provide the object's label within a single word or phrase. ",
)

# BACKGROUND (calls 4–5), versions 0–3 (§4.2, §4.3; paper Table 11). "of the video" also in frame passes.
BACKGROUND: tuple[str, ...] = (
    "Describe the background scene of the video, excluding any {obj_name}. Answer the question using a single word or phrase.",
    "Describe the background scene of the video. Answer the question using a single word or phrase.",
    "Describe the background of the video while excluding any {obj_name}, using a single word or short phrase.",
    "Describe the background scene of the video, excluding the objects referred to in the given expression or question '{sent}'. Answer the question using a single word or phrase.",
)

# OBJ_CHOICE (call 3), versions 0–3 (§4.2, §4.3; paper Table 12)
OBJ_CHOICE: tuple[str, ...] = (
    "Given:\n- Expression: '{ref_query}'\n- Candidate object class list: {obj_cls_list}\nGoal: Identify the object class referred to by the expression. Instructions:\n1. If the expression is **clear**, rely on it directly (e.g., 'a person driving a car' → 'person').\n2. If the expression is **vague**, use the object class list to support your decision (e.g., check frequency and plausibility).\n3. Avoid defaulting to the most frequent class unless the expression lacks clarity.\nOutput the most likely referred object class - just the label.\n",
    "Given the expression ‘{ref_query}’ and the candidate object classes {obj_cls_list}, select the single class label that best matches the object referred to in the expression.\n",
    "Using the expression ‘{ref_query}’ and the candidate object classes {obj_cls_list}, determine which object class the expression refers to.\nIf the reference is explicit, rely on the expression; if ambiguous, use the class list as support.\nOutput only the most likely object class.\n",
    "Given:\n- Expression: '{ref_query}'\nGoal: Identify the object class referred to by the expression. (e.g., 'a person driving a car' → 'person').\nOutput the most likely referred object class - just the label.\n",
)


def is_empty_expression(expression: str) -> bool:
    """Empty or whitespace only: no object is named."""
    return not expression.strip()


def preprocess_expression(expression: str, *, allow_empty: bool = False) -> str:
    """SPEC §2.1: append "." unless the expression ends with "?" or "."; no stripping (dataset runs).

    An empty or whitespace-only expression is an error unless ``allow_empty``: benchmark runs score every
    expression of the meta file, and the paper's code ran such an expression as §2.1 makes it (``""`` → ``"."``).
    """
    if not allow_empty and is_empty_expression(expression):
        raise DecafError("the expression is empty")
    return expression if expression.endswith(("?", ".")) else expression + "."


def check_version(kind: str, version: int) -> int:
    if version not in PROMPT_VERSIONS:
        raise SettingError(kind, f"must be 0, 1, 2 or 3, got {version}")
    return version


def object_prompt(q: str, version: int = 0) -> str:
    """OBJ_CLS filled with ``{sent}`` = q.lower() (§4.1)."""
    return OBJ_CLS[check_version("prompt_obj_ver", version)].format(sent=q.lower())


def background_prompt(q: str, obj_name: str | None, version: int = 0) -> str:
    """BACKGROUND filled with ``obj_name`` (v0, v2) or ``{sent}`` (v3); v1 uses neither (§4.3)."""
    return BACKGROUND[check_version("prompt_bg_ver", version)].format(obj_name=obj_name, sent=q.lower())


def background_needs_object_name(version: int) -> bool:
    """Call 3 may be skipped when the background template has no ``{obj_name}`` (§4.3)."""
    return "{obj_name}" in BACKGROUND[check_version("prompt_bg_ver", version)]


def choice_prompt(q: str, answers: list[str], version: int = 0) -> str:
    """OBJ_CHOICE filled with ``{ref_query}`` and the comma-joined lower-cased answers (§4.8)."""
    obj_cls_list = ",".join(answer.lower() for answer in answers)
    return OBJ_CHOICE[check_version("prompt_obj_cnt_ver", version)].format(ref_query=q.lower(),
                                                                         obj_cls_list=obj_cls_list)
