"""Attention capture on stock transformers 5 models (SPEC §5.7).

The LLM's attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. We register, under a
name of our own, a function that runs the configured kernel unchanged (sdpa or flash-attention, §5.8d) and, while
a capture is armed, hands the post-RoPE query and key of the selected decoder layers to a rollout (§5.2–§5.4). Only
the language model's config is switched to that name, so the vision tower never reaches the capture.

Two facts of transformers 5 shape this module:

* A name registered in ``AttentionInterface`` gets **no attention mask** unless the same name is also registered
  in ``AttentionMaskInterface``; we register the base kernel's mask function under our name, so masks (causal and
  padding) are exactly what the base kernel would get.
* ``_from_config`` keeps the config object, so sub-models share it; we switch the text config only, and restore it
  in :meth:`AttentionCapture.detach`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_PREFIX = "decaf_capture_"


class LayerSink(Protocol):
    """What receives one captured layer (the rollout of :mod:`model.attention.rollout`)."""

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None: ...


class Tee:
    """One capture fed to several sinks, e.g. the streamed rollout and its literal oracle on the same q/k."""

    def __init__(self, *sinks: LayerSink):
        self.sinks = sinks

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.add_layer(q, k)


class QueryRecorder:
    """Keeps each captured layer's post-RoPE q of a cached prefix's prefill (SPEC §5.8f); its k stays in the KV
    cache, which hands it back with the suffix's keys."""

    def __init__(self) -> None:
        self.queries: list[torch.Tensor] = []

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.queries.append(q.detach())


class PrefixedQueries:
    """Feeds a sink the full q and k of a pass continued after a cached prefix (SPEC §5.8f).

    The continued pass's attention receives only the suffix rows of q but every key, prefix keys from the cache
    included; the prefix rows of q come from :class:`QueryRecorder`, one tensor per captured layer in layer order.
    The sink then sees exactly the q and k of one unshared forward over the whole sequence.
    """

    def __init__(self, sink: LayerSink, prefix_queries: Sequence[torch.Tensor]):
        self.sink = sink
        self.prefix_queries = prefix_queries
        self.layer = 0

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.sink.add_layer(torch.cat([self.prefix_queries[self.layer], q], dim=2), k)
        self.layer += 1


class _Armed:
    """State of one armed capture: which query and key lengths to accept and where each layer goes."""

    def __init__(self, sink: LayerSink, seq_len: int, key_len: int, layer_of: dict[int, int]):
        self.sink = sink
        self.seq_len = seq_len
        self.key_len = key_len
        self.layer_of = layer_of
        self.seen: list[int] = []


# The registered function looks its state up here, keyed by attention-module identity. A dict (not a
# closure) keeps one registered function valid for any number of models.
_ARMED: dict[int, _Armed] = {}


def _capturing_attention(base: str):
    base_fn = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        state = _ARMED.get(id(module))
        # Decoding steps (query length 1) and any other call with different lengths are never captured: only the
        # prefill's query rows enter the rollout (SPEC §1.2, §4.6). A prefill continued after a cached prefix has
        # fewer query rows than keys (SPEC §5.8f).
        if state is not None and query.shape[2] == state.seq_len and key.shape[2] == state.key_len:
            state.seen.append(state.layer_of[id(module)])
            state.sink.add_layer(query, key)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def register_capture_kernel(base: str) -> str:
    """Register the capturing wrapper of ``base`` (attention and mask functions) and return its name."""
    if base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} cannot be wrapped for capture; use 'sdpa' or "
                         "'flash_attention_2'")
    name = CAPTURE_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing_attention(base))
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


class AttentionCapture:
    """Arms the capture of decoder layers ``[start, end)`` of one model's language model.

    ``attention_modules`` are the LLM decoder layers' self-attention modules in layer order and ``text_config``
    the config object they read ``_attn_implementation`` from (the adapter supplies both, SPEC §3.0 iii).
    """

    def __init__(self, text_config: Any, attention_modules: Sequence[nn.Module], start: int, end: int):
        if not 0 <= start < end <= len(attention_modules):
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {len(attention_modules)} layers")
        self.text_config = text_config
        self.base = text_config._attn_implementation
        if self.base.startswith(CAPTURE_PREFIX):
            raise RuntimeError("this model already has an AttentionCapture attached")
        self.start, self.end = start, end
        self.layer_of = {id(attention_modules[i]): i for i in range(start, end)}
        text_config._attn_implementation = register_capture_kernel(self.base)

    def detach(self) -> None:
        """Give the language model its original attention implementation back."""
        self.text_config._attn_implementation = self.base

    @contextlib.contextmanager
    def armed(self, sink: LayerSink, seq_len: int, key_len: int | None = None) -> Iterator[None]:
        """Capture the forward pass(es) inside the block whose query length is ``seq_len`` and key length
        ``key_len`` (default ``seq_len``): the prefill, or a prefill continued after a cached prefix."""
        state = _Armed(sink, seq_len, seq_len if key_len is None else key_len, self.layer_of)
        for module_id in self.layer_of:
            _ARMED[module_id] = state
        try:
            yield
        finally:
            for module_id in self.layer_of:
                _ARMED.pop(module_id, None)
        expected = list(range(self.start, self.end))
        if state.seen != expected:
            raise RuntimeError(f"capture saw layers {state.seen[:8]}… but expected exactly {self.start}..{self.end - 1} "
                               "once each; the model's attention dispatch is not what the adapter assumed")
