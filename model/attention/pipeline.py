"""The five MLLM calls of one expression (SPEC §1.2–§1.3, §4, §5.6, §5.8).

Family-agnostic: everything model-specific comes from the adapter (:mod:`model.adapters.base`). Calls 1, 2, 4 and
5 capture the prefill's attention into a rollout (:mod:`model.attention.rollout`) through :class:`model.attention.capture.AttentionCapture`;
call 3 is text only. Text is decoded only where it is used (§5.8c): calls 1–2 always, calls 4–5 only with
``save_bg_captions``. Decoding runs through the library's ``generate`` with the capture armed for its prefill only,
so each captured call costs one prefill, and greedy decoding continues from that prefill's KV cache.

Per-video sharing (SPEC §5.8f): inside :meth:`PromptingPipeline.video_session` (or :meth:`run_video`) the prefix of
each visual input — every token before the first prompt-text token: system turn, user header, visual tokens and
their wrappers — is prefilled once, vision tower included, keeping its KV cache and the captured layers'
post-RoPE q. Every later call on the same visual input (object and background prompts, every expression of the
video) tokenises only its own text suffix, prefills it on a copy of that cache and decodes from there; its rollout
gets the prefix rows' q back, so it runs over all rows exactly as one unshared forward would.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from model.adapters.base import MLLMAdapter, VisualBatch
from model.attention import DEFAULT_ATTN_MAX_BATCH, DEFAULT_ROLLOUT_IMPL, prompts
from model.attention.capture import AttentionCapture, PrefixedQueries, QueryRecorder
from model.attention.rollout import make_rollout

log = logging.getLogger(__name__)

#: inputs holding one entry per sequence position, cut at the prefix's end; all others (pixels, grids) belong to
#: the visual tokens, which lie in the prefix (SPEC §4.5)
SEQUENCE_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "mm_token_type_ids", "token_type_ids")
#: two one-letter prompts that differ in their first character: where a rendering stops agreeing with both, the
#: prompt's own text begins
PROMPT_PROBES = ("a", "b")


@dataclass(frozen=True)
class PipelineSettings:
    """Stage-1 method settings (SPEC §13.2)."""

    layer_start: int
    layer_end: int  # exclusive, resolved
    obj_version: int = 0
    bg_version: int = 0
    choice_version: int = 0
    attn_max_batch: int | str = DEFAULT_ATTN_MAX_BATCH  # an int, or "auto": start at T and halve on CUDA out-of-memory
    rollout_impl: str = DEFAULT_ROLLOUT_IMPL
    rollout_dtype: torch.dtype = torch.float32
    no_background: bool = False
    save_bg_captions: bool = False
    max_new_tokens: int = prompts.MAX_NEW_TOKENS  # §4.7; smaller only for smoke tests of random models
    share_prefix: bool = True  # per-video prefix sharing in video sessions (SPEC §5.8f); --no_prefix_cache: off


@dataclass
class ExpressionMaps:
    """Raw rollout maps of one expression (visual tokens only, fp32) and the texts that produced them."""

    maps: dict[str, torch.Tensor]
    video_grid: tuple[int, int, int]
    frame_grid: tuple[int, int, int]
    tiling: tuple[int, int] | None
    prompts: dict[str, str | None]
    texts: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prefix:
    """One visual input's shared prefix (SPEC §5.8f) and what a call continued after it needs."""

    batch: VisualBatch  # the first call's batch without inputs: grid, tiling, extra of the visual input
    text_ids: list[int]  # the prefix as the chat template renders it, before placeholder expansion
    ids: torch.Tensor  # (B, P) token ids of the expanded prefix
    visual: torch.Tensor  # (B, P) bool: the visual positions V, all inside the prefix
    embeds: torch.Tensor | None  # (B, P, D) where the adapter feeds embeddings
    positions: torch.Tensor | None  # (3, B, P) where the adapter gives explicit (M-RoPE) positions
    cache: Any = None  # the LLM's KV cache after the prefix
    queries: list[torch.Tensor] = field(default_factory=list)  # post-RoPE q (B, H, P, d) per captured layer

    @property
    def nbytes(self) -> int:
        """Device memory this prefix holds: its KV cache, recorded queries and inputs."""
        tensors = [self.ids, self.visual, self.embeds, self.positions, *self.queries]
        for layer in getattr(self.cache, "layers", ()):
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _continue_positions(prefix: torch.Tensor, count: int) -> torch.Tensor:
    """Prefix positions followed by ``count`` text positions: one more per token than the last prefix token, in
    every row (text after a text token, under both M-RoPE rules of SPEC §3.1 and §3.4)."""
    step = torch.arange(1, count + 1, dtype=prefix.dtype, device=prefix.device)
    return torch.cat([prefix, prefix[..., -1:] + step], dim=-1)


def _copy_cache(cache: Any) -> Any:
    """A fresh DynamicCache holding a copy of ``cache``'s keys and values, which the call may extend."""
    from transformers.cache_utils import DynamicCache

    fresh = DynamicCache()
    for index, layer in enumerate(cache.layers):
        fresh.update(layer.keys, layer.values, index)
    return fresh


class ProgressBar(Protocol):
    """What the pipeline reports its MLLM passes to (a ``tqdm`` bar, or the stage-1 run's job bar)."""

    def reset(self, total: int | None = None) -> None: ...

    def update(self, n: int = 1) -> Any: ...


class PromptingPipeline:
    """Runs calls 1–5 for one expression on one adapter (SPEC §1.3).

    ``bar``, when set, is reset to :meth:`pass_count` at the start of every expression and advanced after every
    MLLM forward or generate call (the video passes, each frame chunk, call 3).
    """

    def __init__(self, adapter: MLLMAdapter, settings: PipelineSettings):
        self.adapter = adapter
        self.settings = settings
        self.capture = AttentionCapture(adapter.text_config, adapter.attention_modules(), settings.layer_start,
                                        settings.layer_end)
        parameters = inspect.signature(adapter.model.forward).parameters
        self._forward_takes_logits_to_keep = "logits_to_keep" in parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x
        self.bar: ProgressBar | None = None
        # visual input (kind, frame paths) → its shared prefix, or None where it cannot be shared; None outside a
        # video session
        self._prefixes: dict[tuple[str, tuple[str, ...]], _Prefix | None] | None = None
        self._probe_ids: dict[str, list[list[int]]] = {}
        #: prefix prefills and continued passes since the pipeline was made (what the tests and benchmark read)
        self.prefix_stats = {"prefixes": 0, "continued": 0, "unshared": 0}
        #: most bytes the prefixes of the current (or last) video session held at once: what sharing costs a video
        self.session_peak_bytes = 0

    def pass_count(self, num_frames: int) -> int | None:
        """MLLM forward/generate calls of one expression on ``num_frames`` frames (SPEC §1.2); None when
        ``attn_max_batch`` is "auto", whose chunk count depends on memory."""
        s = self.settings
        if s.attn_max_batch == "auto":
            return None
        chunks = math.ceil(num_frames / int(s.attn_max_batch))
        if s.no_background:
            return 1 + chunks
        return 2 + 2 * chunks + int(prompts.background_needs_object_name(s.bg_version))

    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _greedy(self) -> dict[str, Any]:
        """Greedy decoding (§4.7); every other generation_config setting of the checkpoint still applies."""
        return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.settings.max_new_tokens, "use_cache": True}

    @staticmethod
    def _new_tokens(output: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Generated tokens only: ``generate`` echoes the prompt ids, but not prompts given as embeddings."""
        return output[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else output

    def _last_logits(self) -> dict[str, Any]:
        return {"logits_to_keep": 1} if self._forward_takes_logits_to_keep else {}

    def _rollout(self, batch: VisualBatch) -> Any:
        return make_rollout(self.settings.rollout_impl, batch.visual_mask, batch.key_mask,
                            dtype=self.settings.rollout_dtype)

    def _maps(self, rollout: Any, batch: VisualBatch) -> list[torch.Tensor]:
        """Each row's (t, h, w) map from its rollout row (SPEC §6.1); advances the progress bar."""
        rows = rollout.rows()
        maps = [self.adapter.row_map(rows[b][batch.visual_mask[b]].float().cpu(), batch)
                for b in range(rows.shape[0])]
        self._tick()
        return maps

    # ----- one captured pass -------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_pass(self, batch: VisualBatch, decode: bool) -> tuple[list[torch.Tensor], list[str] | None]:
        """Prefill ``batch`` with capture; return each row's (t, h, w) map and, if ``decode``, its answer."""
        rollout = self._rollout(batch)
        model = self.adapter.model
        texts = None
        with self.capture.armed(rollout, batch.seq_len):
            if decode:
                output = model.generate(**batch.inputs, **self._greedy())
                texts = self.adapter.decode(self._new_tokens(output, batch.inputs))
            else:
                model(**batch.inputs, use_cache=False, **self._last_logits())
        return self._maps(rollout, batch), texts

    # ----- per-video prefix sharing (SPEC §5.8f) -----------------------------------------------------------
    @contextlib.contextmanager
    def video_session(self) -> Iterator[None]:
        """Calls inside the block share each visual input's prefix (SPEC §5.8f); the prefixes are freed at its end.

        Visual inputs are told apart by their frame paths, so the block may hold any calls; sharing pays when they
        are the expressions of one video. With ``share_prefix`` off the block changes nothing (the reference path).
        """
        if not self.settings.share_prefix or self._prefixes is not None:
            yield
            return
        self._prefixes = {}
        self.session_peak_bytes = 0
        try:
            yield
        finally:
            self._prefixes = None

    def _text_split(self, prompt: str, visual: str) -> tuple[list[int], list[int]]:
        """(prefix, suffix) of the rendered conversation before placeholder expansion: the suffix starts at the
        first token that depends on the prompt text (SPEC §4.5: the visual item comes first)."""
        tokenize = self.adapter.tokenizer
        if visual not in self._probe_ids:
            self._probe_ids[visual] = [tokenize(self.adapter.render(probe, visual))["input_ids"]
                                       for probe in PROMPT_PROBES]
        own = tokenize(self.adapter.render(prompt, visual))["input_ids"]
        common = min(_common_length(own, probe) for probe in self._probe_ids[visual])
        return own[:common], own[common:]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.model.get_input_embeddings()(ids)

    @torch.inference_mode()  # no autograd graph: the prefix prefill of a 7B model would keep every activation
    def _new_prefix(self, batch: VisualBatch, text_prefix: list[int], suffix: list[int]) -> _Prefix | None:
        """The prefix of ``batch`` if its calls can continue after it exactly, else None (padding, or a suffix that
        is not the rendered text's tail)."""
        ids = batch.inputs.get("input_ids", batch.extra.get("input_ids"))
        length, count = batch.seq_len, len(suffix)
        start = length - count
        if (not self.adapter.shares_prefix or ids is None or not suffix or start < 1
                or not bool(batch.key_mask.all()) or bool(batch.visual_mask[:, start:].any())):
            return None
        expected = torch.tensor(suffix, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], count)
        if not torch.equal(ids[:, start:], expected):
            return None
        positions = self.adapter.position_ids(batch)
        embeds = batch.inputs.get("inputs_embeds")
        entry = _Prefix(batch=VisualBatch({}, batch.visual_mask, batch.key_mask, batch.grid, batch.tiling,
                                          batch.extra),
                        text_ids=text_prefix, ids=ids[:, :start], visual=batch.visual_mask[:, :start],
                        embeds=None if embeds is None else embeds[:, :start],
                        positions=None if positions is None else positions[..., :start])
        # what a continued call will be fed must be exactly this call's own inputs
        continued, _ = self._continued(entry, suffix)
        if positions is not None and not torch.equal(continued["position_ids"], positions):
            return None
        if embeds is not None and not torch.equal(continued["inputs_embeds"], embeds):
            return None
        inputs = {name: value[:, :start] if name in SEQUENCE_INPUTS else value
                  for name, value in batch.inputs.items() if name != "position_ids"}
        if entry.positions is not None:
            inputs["position_ids"] = entry.positions
        from transformers.cache_utils import DynamicCache, DynamicLayer

        entry.cache = DynamicCache()
        recorder = QueryRecorder()
        with self.capture.armed(recorder, start):  # the vision tower runs here, once per visual input
            self.adapter.model(**inputs, use_cache=True, **{self._cache_kwarg: entry.cache}, **self._last_logits())
        entry.queries = recorder.queries
        if not all(type(layer) is DynamicLayer for layer in entry.cache.layers):
            return None  # e.g. sliding-window layers, which drop keys: the cache could not be continued exactly
        self.prefix_stats["prefixes"] += 1
        return entry

    def _continued(self, entry: _Prefix, suffix: list[int]) -> tuple[dict[str, Any], VisualBatch]:
        """Inputs of the whole sequence prefix + ``suffix`` as the model gets them, and the batch for the rollout."""
        batch_size = entry.ids.shape[0]
        tail = torch.tensor(suffix, dtype=entry.ids.dtype, device=entry.ids.device).expand(batch_size, len(suffix))
        ids = torch.cat([entry.ids, tail], dim=1)
        inputs: dict[str, Any] = {"attention_mask": torch.ones_like(ids)}
        if entry.embeds is None:
            inputs["input_ids"] = ids
        else:  # embedding families keep getting embeddings, so generate sees what the unshared call sees
            inputs["inputs_embeds"] = torch.cat([entry.embeds, self._embed(tail).to(entry.embeds.dtype)], dim=1)
        if entry.positions is not None:
            inputs["position_ids"] = _continue_positions(entry.positions, len(suffix))
        visual = torch.cat([entry.visual, torch.zeros_like(tail, dtype=torch.bool)], dim=1)
        base = entry.batch
        return inputs, VisualBatch({}, visual, torch.ones_like(visual), base.grid, base.tiling, base.extra)

    @torch.inference_mode()
    def _continued_pass(self, entry: _Prefix, suffix: list[int],
                        decode: bool) -> tuple[list[torch.Tensor], list[str] | None]:
        """One captured call prefilling only ``suffix`` on a copy of the prefix's cache (SPEC §5.8f)."""
        inputs, batch = self._continued(entry, suffix)
        start, length = entry.ids.shape[1], batch.seq_len
        rollout = self._rollout(batch)
        cache = {self._cache_kwarg: _copy_cache(entry.cache)}  # generate and the forward extend it
        model = self.adapter.model
        texts = None
        with self.capture.armed(PrefixedQueries(rollout, entry.queries), length - start, key_len=length):
            if decode:
                output = model.generate(**inputs, **cache, **self._greedy())
                texts = self.adapter.decode(self._new_tokens(output, inputs))
            else:
                step = {name: value[..., start:] if name == "position_ids" else
                        value if name == "attention_mask" else value[:, start:] for name, value in inputs.items()}
                model(**step, use_cache=True, **cache, **self._last_logits())
        self.prefix_stats["continued"] += 1
        return self._maps(rollout, batch), texts

    def _pass(self, kind: str, frames: Sequence[Path], prompt: str, build: Callable[[], VisualBatch],
              decode: bool) -> tuple[list[torch.Tensor], list[str] | None, VisualBatch]:
        """One captured call on a visual input: continued after its shared prefix inside a video session, else
        (or where it cannot be shared) the unshared reference. Returns the maps, the answers and a batch that
        describes the visual input (grid, tiling, extra)."""
        if self._prefixes is None:
            batch = build()
            return (*self.capture_pass(batch, decode), batch)
        key = (kind, tuple(str(path) for path in frames))
        text_prefix, suffix = self._text_split(prompt, kind)
        batch = None
        if key not in self._prefixes:
            batch = build()
            self._prefixes[key] = self._new_prefix(batch, text_prefix, suffix)
            held = sum(entry.nbytes for entry in self._prefixes.values() if entry is not None)
            self.session_peak_bytes = max(self.session_peak_bytes, held)
            if self._prefixes[key] is None:
                log.info("a %s input cannot share its prefix (SPEC §5.8f); its calls run unshared", kind)
        entry = self._prefixes[key]
        if entry is None or entry.text_ids != text_prefix:
            batch = build() if batch is None else batch
            self.prefix_stats["unshared"] += 1
            return (*self.capture_pass(batch, decode), batch)
        return (*self._continued_pass(entry, suffix, decode), entry.batch)

    def frame_passes(self, frames: Sequence[Path], prompt: str, video: VisualBatch,
                     decode: bool) -> tuple[torch.Tensor, list[str] | None, tuple[int, int] | None]:
        """Calls 2 and 5: single-image conversations in chunks of ``attn_max_batch`` (§5.6)."""
        auto = self.settings.attn_max_batch == "auto"
        size = len(frames) if auto else int(self.settings.attn_max_batch)
        maps: list[torch.Tensor] = []
        texts: list[str] = []
        tiling = None
        start = 0
        while start < len(frames):
            chunk = frames[start:start + size]
            try:
                chunk_maps, chunk_texts, batch = self._pass(
                    "image", chunk, prompt, lambda: self.adapter.frame_batch(chunk, prompt, video), decode)
            except torch.OutOfMemoryError:
                if not auto or size == 1:
                    raise
                size = max(1, size // 2)
                log.warning("CUDA out of memory on a frame chunk of %d; retrying with chunks of %d", len(chunk), size)
                torch.cuda.empty_cache()
                continue
            tiling = batch.tiling
            maps += chunk_maps
            texts += chunk_texts or []
            start += len(chunk)
        return torch.cat(maps, dim=0), (texts if decode else None), tiling

    # ----- the five calls ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_text(self, prompt: str) -> str:
        """Call 3: greedy text-only generation (§4.7)."""
        inputs = self.adapter.text_inputs(prompt)
        output = self.adapter.model.generate(**inputs, **self._greedy())
        self._tick()
        return self.adapter.decode(self._new_tokens(output, inputs))[0]

    def run(self, frames: Sequence[Path], expression: str, *, allow_empty: bool = False) -> ExpressionMaps:
        """Calls 1–5 on the T sampled frames (SPEC §1.3); ``expression`` is the raw text (§2.1 applied here).

        An empty or whitespace-only expression is refused unless ``allow_empty`` (benchmark runs, as the paper's).
        """
        s = self.settings
        q = prompts.preprocess_expression(expression, allow_empty=allow_empty)
        if self.bar is not None:
            self.bar.reset(total=self.pass_count(len(frames)))
        obj_prompt = prompts.object_prompt(q, s.obj_version)

        (obj_video,), (answer_video,), video_obj = self._pass(  # call 1
            "video", frames, obj_prompt, lambda: self.adapter.video_batch(frames, obj_prompt), decode=True)
        obj_frame, answers_frame, tiling = self.frame_passes(frames, obj_prompt, video_obj, decode=True)  # call 2
        maps = {"obj_video": obj_video, "obj_frame": obj_frame}
        texts: dict[str, Any] = {"obj_cls_video": answer_video, "obj_cls_frame": answers_frame, "obj_name": None,
                                 "bg_caption_video": None, "bg_caption_frame": None}
        used_prompts: dict[str, str | None] = {"obj": obj_prompt, "choice": None, "bg": None}

        if not s.no_background:
            if prompts.background_needs_object_name(s.bg_version):  # call 3
                used_prompts["choice"] = prompts.choice_prompt(q, [answer_video] + answers_frame, s.choice_version)
                texts["obj_name"] = self.generate_text(used_prompts["choice"]).strip().lower()
            bg_prompt = prompts.background_prompt(q, texts["obj_name"], s.bg_version)
            used_prompts["bg"] = bg_prompt
            (bg_video,), captions, video_bg = self._pass(  # call 4
                "video", frames, bg_prompt, lambda: self.adapter.video_batch(frames, bg_prompt),
                decode=s.save_bg_captions)
            bg_frame, frame_captions, _ = self.frame_passes(frames, bg_prompt, video_bg, decode=s.save_bg_captions)
            maps.update(bg_video=bg_video, bg_frame=bg_frame)  # call 5 ↑
            if s.save_bg_captions:
                texts.update(bg_caption_video=captions[0], bg_caption_frame=frame_captions)

        return ExpressionMaps(maps=maps, video_grid=tuple(obj_video.shape), frame_grid=tuple(obj_frame.shape),
                              tiling=tiling, prompts=used_prompts, texts=texts)

    def iter_video(self, frames: Sequence[Path], expressions: Sequence[str], *,
                   allow_empty: bool = False) -> Iterator[ExpressionMaps]:
        """Calls 1–5 of every expression of one video (the same T sampled frames), in order, sharing each visual
        input's prefix across all of them (SPEC §5.8f); each result is yielded as soon as it is complete."""
        with self.video_session():
            for expression in expressions:
                yield self.run(frames, expression, allow_empty=allow_empty)

    def run_video(self, frames: Sequence[Path], expressions: Sequence[str], *,
                  allow_empty: bool = False) -> list[ExpressionMaps]:
        """:meth:`iter_video` as a list."""
        return list(self.iter_video(frames, expressions, allow_empty=allow_empty))
