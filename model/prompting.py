"""The five MLLM calls of one expression (SPEC §1.2–§1.3, §4, §5.6, §5.8).

Family-agnostic: everything model-specific comes from the adapter (:mod:`model.adapters.base`). Calls 1, 2, 4 and
5 capture the prefill's attention into a rollout (:mod:`model.rollout`) through :class:`model.capture.AttentionCapture`;
call 3 is text only. Text is decoded only where it is used (§5.8c): calls 1–2 always, calls 4–5 only with
``save_bg_captions``. Decoding runs through the library's ``generate`` with the capture armed for its prefill only,
so each captured call costs one prefill, and greedy decoding continues from that prefill's KV cache.
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from . import prompts
from .adapters.base import MLLMAdapter, VisualBatch
from .capture import AttentionCapture
from .rollout import make_rollout

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class PipelineSettings:
    """Stage-1 method settings (SPEC §13.2)."""

    layer_start: int
    layer_end: int  # exclusive, resolved
    obj_version: int = 0
    bg_version: int = 0
    choice_version: int = 0
    attn_max_batch: int | str = 4  # an int, or "auto": start at T and halve on CUDA out-of-memory
    rollout_impl: str = "streamed"
    rollout_dtype: torch.dtype = torch.float32
    no_background: bool = False
    save_bg_captions: bool = False
    max_new_tokens: int = MAX_NEW_TOKENS  # the paper's value; smaller only for smoke tests of random models


@dataclass
class ExpressionMaps:
    """Raw rollout maps of one expression (visual tokens only, fp32) and the texts that produced them."""

    maps: dict[str, torch.Tensor]
    video_grid: tuple[int, int, int]
    frame_grid: tuple[int, int, int]
    tiling: tuple[int, int] | None
    prompts: dict[str, str | None]
    texts: dict[str, Any] = field(default_factory=dict)


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
        self._forward_takes_logits_to_keep = "logits_to_keep" in inspect.signature(adapter.model.forward).parameters
        self.bar: ProgressBar | None = None

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

    # ----- one captured pass -------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_pass(self, batch: VisualBatch, decode: bool) -> tuple[list[torch.Tensor], list[str] | None]:
        """Prefill ``batch`` with capture; return each row's (t, h, w) map and, if ``decode``, its answer."""
        rollout = make_rollout(self.settings.rollout_impl, batch.visual_mask, batch.key_mask,
                               dtype=self.settings.rollout_dtype)
        model = self.adapter.model
        texts = None
        with self.capture.armed(rollout, batch.seq_len):
            if decode:
                output = model.generate(**batch.inputs, **self._greedy())
                texts = self.adapter.decode(self._new_tokens(output, batch.inputs))
            else:
                extra = {"logits_to_keep": 1} if self._forward_takes_logits_to_keep else {}
                model(**batch.inputs, use_cache=False, **extra)
        rows = rollout.rows()
        maps = [self.adapter.row_map(rows[b][batch.visual_mask[b]].float().cpu(), batch)
                for b in range(rows.shape[0])]
        self._tick()
        return maps, texts

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
                batch = self.adapter.frame_batch(chunk, prompt, video)
                chunk_maps, chunk_texts = self.capture_pass(batch, decode)
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

        video_obj = self.adapter.video_batch(frames, obj_prompt)  # call 1
        (obj_video,), (answer_video,) = self.capture_pass(video_obj, decode=True)
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
            video_bg = self.adapter.video_batch(frames, bg_prompt)  # call 4
            (bg_video,), captions = self.capture_pass(video_bg, decode=s.save_bg_captions)
            bg_frame, frame_captions, _ = self.frame_passes(frames, bg_prompt, video_bg, decode=s.save_bg_captions)
            maps.update(bg_video=bg_video, bg_frame=bg_frame)  # call 5 ↑
            if s.save_bg_captions:
                texts.update(bg_caption_video=captions[0], bg_caption_frame=frame_captions)

        return ExpressionMaps(maps=maps, video_grid=tuple(obj_video.shape), frame_grid=tuple(obj_frame.shape),
                              tiling=tiling, prompts=used_prompts, texts=texts)
