"""Qwen2-vocabulary tokenizers for the tiny LLaVA-OneVision and InternVL3 checkpoints.

Both families put a Qwen2 LLM behind their vision tower and extend the Qwen2 tokenizer with a few family tokens
(SPEC §3.2, §3.3). The byte-level BPE itself comes from :mod:`model.selftest.tiny.qwen` (the tiny stand-in vocabulary, or the
real 151,643 Qwen2 ranks); this module only decides which Qwen special tokens precede the family tokens, so the
family tokens land on the ids the real checkpoints use when the real vocabulary is chosen:

* LLaVA-OneVision (Qwen2-7B-Instruct tokenizer): ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at
  151643–151645, then ``<image>`` 151646 and ``<video>`` 151647;
* InternVL3-hf (Qwen2.5-VL tokenizer): all 22 Qwen2.5 special tokens at 151643–151664, then ``<img>`` 151665,
  ``</img>`` 151666, ``<IMG_CONTEXT>`` 151667, the grounding tokens and ``<video>``.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from model.selftest.tiny.qwen import QWEN_SPECIAL_TOKENS, REAL_BPE_RANKS, build_tiny_backend, real_qwen2_tokenizer_json

#: embedding rows of a tiny model are padded to a multiple of this (as Qwen pads the real ones)
TINY_VOCAB_MULTIPLE = 64


def qwen_backend(real_vocab: bool, num_qwen_specials: int = len(QWEN_SPECIAL_TOKENS)):
    """A ``tokenizers.Tokenizer``: Qwen2 byte-level BPE followed by the first ``num_qwen_specials`` Qwen specials.

    The Qwen specials are appended in id order after the BPE ranks, so dropping a tail of them keeps every other id.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(real_qwen2_tokenizer_json())) if real_vocab else build_tiny_backend()
    if num_qwen_specials == len(QWEN_SPECIAL_TOKENS):
        return backend
    keep = {content for content, _ in QWEN_SPECIAL_TOKENS[:num_qwen_specials]}
    state = json.loads(backend.to_str())
    state["added_tokens"] = [token for token in state["added_tokens"] if token["content"] in keep]
    return Tokenizer.from_str(json.dumps(state))


def add_family_tokens(backend, tokens: Sequence[str]) -> None:
    """Append ``tokens`` as special tokens, each at the next free id."""
    from tokenizers import AddedToken

    for content in tokens:
        token = AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if backend.add_special_tokens([token]) != 1:
            raise RuntimeError(f"family token {content} collides with an existing token")


def qwen2_tokenizer(backend, chat_template: str, **extra: Any):
    """The stock ``Qwen2Tokenizer`` around ``backend`` with the ChatML roles of Qwen2 (eos ``<|im_end|>``)."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(tokenizer_object=backend, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", model_max_length=32768, clean_up_tokenization_spaces=False,
                          split_special_tokens=False, chat_template=chat_template, **extra)


def is_real_vocab(tokenizer) -> bool:
    """True when ``tokenizer`` holds the full Qwen2 BPE vocabulary (the ids of SPEC §3 then apply)."""
    return len(tokenizer) > REAL_BPE_RANKS


def embedding_rows(tokenizer, real_rows: int) -> int:
    """Embedding rows of a tiny model: the real checkpoint's count with the real vocabulary, else padded to 64."""
    if is_real_vocab(tokenizer):
        return real_rows
    return -(-len(tokenizer) // TINY_VOCAB_MULTIPLE) * TINY_VOCAB_MULTIPLE
