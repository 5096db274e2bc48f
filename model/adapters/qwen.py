"""Qwen2-VL and Qwen2.5-VL inputs and token grids (SPEC §3.1).

Frames are resized by us (PIL bicubic, qwen-vl-utils' smart_resize rule) to sizes that are multiples of the
processor's patch × merge factor, and handed to the processor with its own resizing and frame sampling switched
off, so the processor only normalises and patchifies.

Video passes (calls 1 and 4) carry their own M-RoPE position ids, made by :func:`paper_mrope_positions` with the
rule of the paper's library (transformers 4.52, SPEC §3.1): the text after a video block starts one past the
block's largest position in any of the three rows. transformers 5 starts it at ``start + max(h, w)`` instead,
which differs whenever ``(t−1)·interval ≥ max(h, w)`` (e.g. every 16-frame Qwen2.5-VL video resized to a longer
side ≤ 392 px). ``generate`` then extends each row by one per new token, which is 4.52's ``cache_position +
rope_delta``. Image passes (calls 2, 5) and call 3 keep the library's positions: with one temporal slot both rules
agree (``max(0, h−1, w−1) + 1 = max(h, w)``), and call 3 has no visual block.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

from model.adapters.base import MLLMAdapter, VisualBatch, load_rgb
from model.utils.errors import DecafError
from model.utils.video import read_frame_size

#: Qwen2.5-VL's M-RoPE time step per temporal slot: the reference's processor default (fps 2, temporal patch 2)
SECOND_PER_GRID_T = 1.0
MIN_TOKENS = 4  # min_pixels = 4·factor² (the image minimum, also for video, as in the reference)
#: value of ``settings.mrope_positions`` for video passes positioned by :func:`paper_mrope_positions` (§3.1)
PAPER_MROPE = "transformers-4.52"


def paper_mrope_positions(input_ids: torch.Tensor, visual_token_id: int, grids: Sequence[tuple[int, int, int]],
                          interval: float) -> torch.Tensor:
    """(3, L) M-RoPE positions (time, height, width) of one unpadded token sequence, as in transformers 4.52.

    ``grids`` holds the merged (t, h, w) grid of each run of ``visual_token_id`` tokens, in order. Text tokens get
    one position, the same in all three rows, one more than the previous token's. A visual block starting at s puts
    token (i, j, k) at (s + ⌊i·interval⌋, s + j, s + k), and the text after it starts at the block's largest
    position + 1 = s + max(⌊(t−1)·interval⌋, h−1, w−1) + 1 (SPEC §3.1).
    """
    ids = input_ids.tolist()
    positions = torch.empty(3, len(ids), dtype=torch.long)
    blocks = iter(grids)
    next_position, i = 0, 0
    while i < len(ids):
        if ids[i] != visual_token_id:
            positions[:, i] = next_position
            next_position += 1
            i += 1
            continue
        t, h, w = next(blocks)
        size = t * h * w
        if ids[i:i + size] != [visual_token_id] * size:
            raise RuntimeError(f"a visual block of grid {(t, h, w)} needs {size} consecutive visual tokens")
        time = torch.tensor([math.floor(slot * interval) for slot in range(t)])
        block = torch.stack(torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
        positions[:, i:i + size] = next_position + block
        next_position = int(positions[:, i:i + size].max()) + 1
        i += size
    if next(blocks, None) is not None:
        raise RuntimeError("more visual grids than visual blocks in the sequence")
    return positions


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' resize rule in Python floats, operation order kept (SPEC §3.1).

    >>> smart_resize(480, 854, 28, 3136, 400 * 28 * 28)
    (392, 728)
    """
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frame(path: str | Path, size_hw: tuple[int, int]) -> Image.Image:
    """Open as RGB and resize to (h, w) with Pillow's bicubic filter (SPEC §3.1)."""
    height, width = size_hw
    return load_rgb(path).resize((width, height), Image.Resampling.BICUBIC)


class QwenVLAdapter(MLLMAdapter):
    """Qwen2-VL-2B/7B-Instruct and Qwen2.5-VL-3B/7B-Instruct; class chosen from ``model_type`` (§3.1)."""

    family = "qwen2_5_vl"
    model_types = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}
    system_message = None  # the Qwen template inserts "You are a helpful assistant." (§4.4)
    #: (patch, merge, temporal patch) every checkpoint of the family has (SPEC §3.1), or None where the layout is
    #: taken from the processor without a fixed expectation (Qwen3-VL, §3.4)
    vision_layout: ClassVar[tuple[int, int, int] | None] = (14, 2, 2)
    default_image_processor = "slow"  # the reference used use_fast=False (§3.1 "Other facts")
    mrope_positions: ClassVar[str | None] = PAPER_MROPE

    def _model_class(self) -> type:
        if self.family == "qwen2_vl":
            from transformers import Qwen2VLForConditionalGeneration
            return Qwen2VLForConditionalGeneration
        from transformers import Qwen2_5_VLForConditionalGeneration
        return Qwen2_5_VLForConditionalGeneration

    def _processor_kwargs(self) -> dict[str, Any]:
        # right padding: a row's query is then its last real token at the end (§3.1 "Other facts", §5.6)
        return {"padding_side": "right"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        image_processor = self.processor.image_processor
        self.patch = int(image_processor.patch_size)
        self.merge = int(image_processor.merge_size)
        self.temporal_patch = int(image_processor.temporal_patch_size)
        # every Qwen2/2.5-VL checkpoint uses these (SPEC §3.1); anything else is a different architecture
        if self.vision_layout is not None and (self.patch, self.merge, self.temporal_patch) != self.vision_layout:
            raise DecafError(f"{self.checkpoint}: expected patch 14, merge 2, temporal patch 2 for Qwen2/2.5-VL, got "
                             f"{self.patch}, {self.merge}, {self.temporal_patch}")
        self.factor = self.patch * self.merge
        config = self.model.config
        self.video_token_id = int(config.video_token_id)
        self.image_token_id = int(config.image_token_id)
        for token, token_id in (("<|video_pad|>", self.video_token_id), ("<|image_pad|>", self.image_token_id)):
            if self.tokenizer.convert_tokens_to_ids(token) != token_id:
                raise DecafError(f"{self.checkpoint}: tokenizer id of {token} differs from the config's {token_id}")

    # ----- video level (calls 1, 4) ---------------------------------------------------------------------------
    def video_frame_size(self, height: int, width: int) -> tuple[int, int]:
        """(h̄, w̄) of every video frame: smart_resize with the ``attn_max_token`` budget (§3.1)."""
        return smart_resize(height, width, self.factor, MIN_TOKENS * self.factor ** 2,
                            self.options.attn_max_token * self.factor ** 2)

    def video_batch(self, frames: Sequence[Path], prompt: str) -> VisualBatch:
        size = self.video_frame_size(*read_frame_size(frames[0]))
        images = [resize_frame(path, size) for path in frames]
        if len(images) % 2:
            images.append(images[-1])  # odd T: the last frame once more (T' = T + 1)
        inputs = self.processor(text=[self.render(prompt, "video")], videos=[images], do_resize=False,
                                do_sample_frames=False, return_tensors="pt",
                                **self._video_processor_kwargs(len(images)))
        grid_thw = inputs["video_grid_thw"][0].tolist()
        expected = [len(images) // self.temporal_patch, size[0] // self.patch, size[1] // self.patch]
        if grid_thw != expected:
            raise RuntimeError(f"processor gave video_grid_thw {grid_thw}, expected {expected}: it resampled or "
                               "resized the frames")
        if self.family == "qwen2_5_vl":
            # the time index of M-RoPE must advance 1.0 per slot as in the reference (§3.1); the processor's own
            # default for a list of frames differs, so set it explicitly
            inputs["second_per_grid_ts"] = torch.full((1,), SECOND_PER_GRID_T)
        grid = (grid_thw[0], grid_thw[1] // self.merge, grid_thw[2] // self.merge)
        positions = self._video_positions(inputs["input_ids"][0], grid)
        if positions is not None:
            inputs["position_ids"] = positions[:, None, :]  # (3, B = 1, L)
        return self._batch(inputs, [self.video_token_id], grid)

    def video_time_interval(self) -> float:
        """M-RoPE time step per temporal slot: tokens_per_second × second_per_grid_t (2 × 1.0) for Qwen2.5-VL,
        1 for Qwen2-VL, whose time index is the slot index (SPEC §3.1)."""
        if self.family == "qwen2_5_vl":
            return float(self.model.config.vision_config.tokens_per_second) * SECOND_PER_GRID_T
        return 1.0

    def _video_positions(self, input_ids: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor | None:
        """Position ids of a video pass by the paper library's rule (module docstring, SPEC §3.1); None leaves
        them to the model."""
        return paper_mrope_positions(input_ids, self.video_token_id, [grid], self.video_time_interval())

    def _video_processor_kwargs(self, frame_count: int) -> dict[str, Any]:
        """Extra processor arguments of a video of ``frame_count`` frames."""
        if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):
            # the cap only acts when the processor resizes, which it never does here (§3.1); passing the current
            # behaviour explicitly answers its deprecation warning, which would otherwise appear on every run
            return {"cap_pixels_per_frame": False}
        return {}

    def position_ids(self, batch: VisualBatch) -> torch.Tensor:
        """(3, B, L) M-RoPE positions: the video pass's own (paper rule, §3.1), else the library's
        ``get_rope_index``, which the model would run itself on the whole sequence (§3.1, §3.4)."""
        inputs = batch.inputs
        if "position_ids" in inputs:
            return inputs["position_ids"]
        ids = inputs["input_ids"]
        # text 0, image 1, video 2: how the library's processor marks modalities for get_rope_index
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
        extra = {name: inputs[name] for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                 if inputs.get(name) is not None}
        positions, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                       attention_mask=inputs.get("attention_mask"), **extra)
        return positions

    # ----- frame level (calls 2, 5) ---------------------------------------------------------------------------
    def frame_image_size(self, frame: Path, video: VisualBatch) -> tuple[int, int]:
        """(H, W) pixels of a frame-level image: s× the video grid, or smart_resize with a per-image budget."""
        if self.options.attn_max_token_per_image > 0:
            height, width = read_frame_size(frame)
            return smart_resize(height, width, self.factor, MIN_TOKENS * self.factor ** 2,
                                self.options.attn_max_token_per_image * self.factor ** 2)
        scale = self.options.attn_resize_scale
        _, h_v, w_v = video.grid
        return scale * h_v * self.factor, scale * w_v * self.factor

    def frame_batch(self, frames: Sequence[Path], prompt: str, video: VisualBatch) -> VisualBatch:
        size = self.frame_image_size(frames[0], video)
        images = [resize_frame(path, size) for path in frames]
        text = self.render(prompt, "image")
        inputs = self.processor(text=[text] * len(images), images=images, do_resize=False, return_tensors="pt")
        grids = inputs["image_grid_thw"].tolist()
        expected = [1, size[0] // self.patch, size[1] // self.patch]
        if any(g != expected for g in grids):
            raise RuntimeError(f"processor gave image_grid_thw {grids}, expected {expected} for every frame")
        grid = (1, expected[1] // self.merge, expected[2] // self.merge)
        return self._batch(inputs, [self.image_token_id], grid)
