"""Qwen3-VL inputs and token grids (SPEC §3.4, an extension beyond the paper).

The Qwen2/2.5-VL pipeline of :mod:`model.adapters.qwen` applies unchanged (§3.4): frames are resized by us with
smart_resize (factor = patch · merge from the processor, 32 for the released checkpoints; min_pixels 4·factor²;
max_pixels = ``attn_max_token``·factor²), an odd T is padded with the last frame, the processor only normalises and
patchifies, and the frame-level images are s× the video frame size (or the per-image budget). Nothing about the
vision layout is hard-coded: patch, merge and temporal patch come from the processor and must agree with the
vision config, and every grid is read back from ``video_grid_thw`` / ``image_grid_thw``.

Extension choices (SPEC §16 item 18), recorded in the cache's ``settings``:

* **Time handling.** Qwen3-VL has no temporal M-RoPE step: the stock ``get_rope_index`` treats each temporal slot
  as its own (1, h, w) image, and time enters only as text, ``<t seconds>`` before each slot's
  ``<|vision_start|>…<|vision_end|>`` block, which the processor computes from the video metadata (the mean of the
  slot's two frame times). Without metadata the processor assumes 24 fps and warns. We pass the metadata
  explicitly: the T' (padded) frames are presented as a clip sampled at ``CLIP_FPS`` = 2 fps with frame indices
  0..T'−1, so slot i is stamped i + 0.25 s (rendered ``<0.2 seconds>``, ``<1.2 seconds>``, …). This is the
  processor's native sampling rate and the analogue of the Qwen2.5-VL rule of §3.1 (one temporal slot = 1 s); it
  does not depend on the source video's unknown frame rate or on which frames were sampled. The rendered stamps
  are verified after every call.
* **Non-contiguous visual tokens.** The processor expands the template's single ``<|video_pad|>`` into those
  per-slot blocks (transformers 5 keeps the template's outer ``<|vision_start|>``/``<|vision_end|>`` pair around
  them), so V is the exact set of ``<|video_pad|>`` positions, read in sequence order (slot, row, column) (§6.1).
* **min_pixels** = 4·factor² (§3.4) and the default start layer ⌊N_layers/2⌋ (§5.1), e.g. 18 for the 36-layer
  Qwen3-VL-8B.
* No system message is passed (§4.4); the Qwen3-VL template inserts none.
* **M-RoPE positions.** Qwen3-VL has no paper baseline, so its video passes keep the installed library's own
  ``get_rope_index`` (recorded as ``settings.mrope_positions = "library"``); the transformers-4.52 rule that
  Qwen2/2.5-VL video passes reproduce (§3.1) is not applied (§3.4).
* **Image processor.** The library's default, the torchvision ("fast") backend: there is no reference to match.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from model.adapters.base import VisualBatch, read_checkpoint_config
from model.adapters.qwen import QwenVLAdapter
from model.utils.errors import DecafError

#: Frame rate at which the T' frames are presented to the processor (its native sampling rate): slot i at i + 0.25 s
CLIP_FPS = 2.0
#: How the processor renders a slot's time stamp (``Qwen3VLProcessor.replace_video_token``)
TIMESTAMP = re.compile(r"<(\d+\.\d) seconds>")


def slot_timestamps(frame_count: int, fps: float, temporal_patch: int) -> list[str]:
    """The stamps of consecutive frame indices 0..frame_count−1 at ``fps``: mean time of each slot's first and
    last frame, one decimal (as the processor renders them).

    >>> slot_timestamps(4, 2.0, 2)
    ['0.2', '1.2']
    """
    return [f"{(first + first + temporal_patch - 1) / (2 * fps):.1f}"
            for first in range(0, frame_count, temporal_patch)]


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL-2B/4B/8B/32B (dense) and Qwen3-VL-30B-A3B/235B-A22B (MoE); class from ``model_type`` (§3.4)."""

    family = "qwen3_vl"
    model_types = {"qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"}
    system_message = None  # Qwen3-VL: no system message, and the template inserts none (§4.4)
    vision_layout = None  # derived from the processor and checked against the config, never fixed (§3.4)
    default_image_processor = "fast"  # no paper baseline (§3.4): the library's default backend
    mrope_positions = "library"  # the installed transformers' own rule (module docstring, §3.4)

    def _model_class(self) -> type:
        if read_checkpoint_config(self.checkpoint).get("model_type") == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeForConditionalGeneration
            return Qwen3VLMoeForConditionalGeneration
        from transformers import Qwen3VLForConditionalGeneration
        return Qwen3VLForConditionalGeneration

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # the image processor gave patch/merge/temporal patch; the video processor and the vision tower must agree,
        # otherwise grids read from one would not describe the tokens of the other
        video_processor = self.processor.video_processor
        vision = self.model.config.vision_config
        layouts = {
            "image processor": (self.patch, self.merge, self.temporal_patch),
            "video processor": (int(video_processor.patch_size), int(video_processor.merge_size),
                                int(video_processor.temporal_patch_size)),
            "vision config": (int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size)),
        }
        if len(set(layouts.values())) != 1:
            raise DecafError(f"{self.checkpoint}: (patch, merge, temporal patch) differ between "
                             + ", ".join(f"{name} {layout}" for name, layout in layouts.items()))

    # ----- video level (calls 1, 4) ---------------------------------------------------------------------------
    def _video_positions(self, input_ids: Any, grid: tuple[int, int, int]) -> None:
        """None: the library computes Qwen3-VL's positions with its own rule (module docstring, SPEC §3.4)."""
        return None

    def _video_processor_kwargs(self, frame_count: int) -> dict[str, Any]:
        """Explicit clip metadata, so the time stamps the processor writes are ours (module docstring)."""
        return {**super()._video_processor_kwargs(frame_count),
                "video_metadata": [{"total_num_frames": frame_count, "fps": CLIP_FPS,
                                    "frames_indices": list(range(frame_count))}]}

    def video_batch(self, frames: Sequence[Path], prompt: str) -> VisualBatch:
        """§3.4: the §3.1 video input, then t_v = ⌈T/2⌉ and the rendered time stamps are verified."""
        batch = super().video_batch(frames, prompt)
        slots = batch.grid[0]
        if slots != math.ceil(len(frames) / 2):  # what the time alignment of §6.5 serves
            raise RuntimeError(f"processor gave {slots} temporal slots for {len(frames)} frames, expected "
                               f"{math.ceil(len(frames) / 2)}: it resampled them")
        # the visual item precedes the prompt (§4.5), so the text up to the last video token holds every stamp and
        # nothing of the expression
        last_visual = int(batch.visual_mask[0].nonzero()[-1])
        text = self.tokenizer.decode(batch.inputs["input_ids"][0, :last_visual + 1], skip_special_tokens=False)
        stamps = TIMESTAMP.findall(text)
        expected = slot_timestamps(slots * self.temporal_patch, CLIP_FPS, self.temporal_patch)
        if stamps != expected:
            raise RuntimeError(f"processor wrote time stamps {stamps}, expected {expected}: the clip metadata "
                               "was not applied")
        batch.extra["timestamps"] = stamps
        return batch

    def settings(self) -> dict[str, Any]:
        """§12.2 settings plus the extension's time handling (§16 item 18)."""
        return {**super().settings(), "video_fps": CLIP_FPS, "video_frames_indices": "0..T'-1"}
