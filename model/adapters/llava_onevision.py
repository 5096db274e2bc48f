"""LLaVA-OneVision inputs and token grids (SPEC §3.2): the reference's layout on the stock model class.

The stock model appends a learned ``image_newline`` embedding after a video and puts the base (global) image plus a
newline column into every anyres image; the reference has neither. Instead of forking the model, the adapter runs
the stock pieces itself — vision tower, projector, the model's own bilinear pooling (video) and its own unpad /
``anyres_max`` packing (frames) — lays the features out without newline and base features, and hands the language
model ``inputs_embeds`` whose placeholder count equals the feature count. The processor is used for pixels only
(its text expansion would count the newline and base tokens).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from model.adapters.base import (MLLMAdapter, VisualBatch, expand_placeholder, has_real_qwen2_vocab, load_rgb,
                                 processor_size)
from model.utils.errors import DecafError
from model.utils.video import read_frame_size

#: paper checkpoint (llava-onevision-qwen2-7b-ov-hf) values [ckpt], asserted when the real vocabulary is loaded
PAPER_TOKEN_IDS = {"<image>": 151646, "<video>": 151647}
PAPER_TILE, PAPER_FEATURE_SIDE, PAPER_POOLED_SIDE = 384, 27, 14
#: the system turn this family's reference passes explicitly (SPEC §4.4)
SYS_QWEN2 = "You are a helpful assistant."


@dataclass(frozen=True)
class AnyresLayout:
    """Frame-level layout of one image size: the anyres tile grid and the packed token grid (SPEC §3.2)."""

    tiles: tuple[int, int]  # (rows, cols) of 384² tiles, row-major
    padded: tuple[int, int]  # feature grid of the tiles before unpadding: (rows·27, cols·27)
    grid: tuple[int, int]  # (h, w) after unpadding and the anyres_max downsize: the frame map


def max_tiles_of(vision_aspect_ratio: str) -> int:
    """The N of ``anyres_max_N`` (the only aspect mode of LLaVA-OV checkpoints)."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    if match is None:
        raise DecafError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not 'anyres_max_N'; not a LLaVA-OneVision "
                         "checkpoint layout this adapter knows")
    return int(match.group(1))


def anyres_layout(size_hw: tuple[int, int], pinpoints: list[list[int]], tile: int, feature_side: int,
                  max_tiles: int) -> AnyresLayout:
    """Tile grid and packed map of an image of ``size_hw`` = (H, W), without running the model (SPEC §3.2).

    The canvas is the library's ``select_best_resolution``; the unpadding is the library's ``unpad_image`` applied
    to an empty tensor of the padded feature grid's shape; the ``anyres_max`` downsize applies when
    ratio = sqrt(h·w / (max_tiles·side²)) > 1.1. The adapter checks these numbers against the stock packing.

    >>> anyres_layout((480, 854), [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)], 384, 27, 9).grid
    (46, 81)
    """
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    best_h, best_w = select_best_resolution(list(size_hw), pinpoints)
    rows, cols = best_h // tile, best_w // tile
    padded = (rows * feature_side, cols * feature_side)
    height, width = unpad_image(torch.empty((0, *padded)), list(size_hw)).shape[1:]
    ratio = math.sqrt(height * width / (max_tiles * feature_side ** 2))
    if ratio > 1.1:
        height, width = int(height // ratio), int(width // ratio)
    return AnyresLayout(tiles=(rows, cols), padded=padded, grid=(int(height), int(width)))


class LlavaOnevisionAdapter(MLLMAdapter):
    """llava-onevision-qwen2-7b-ov-hf (and other LLaVA-OV checkpoints of the same layout), SPEC §3.2."""

    family = "llava_onevision"
    model_types = {"llava_onevision": "llava_onevision"}
    system_message = SYS_QWEN2  # passed explicitly (§4.4)
    default_image_processor = "slow"  # the paper's reference ran the PIL LlavaOnevisionImageProcessor (§3.2)

    def _model_class(self) -> type:
        from transformers import LlavaOnevisionForConditionalGeneration
        return LlavaOnevisionForConditionalGeneration

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = self.model.config
        vision = config.vision_config
        self.tile = int(vision.image_size)
        # SigLIP's stride-14 patch convolution drops the last 384 − 27·14 = 6 px: 27 features per side
        self.feature_side = self.tile // int(vision.patch_size)
        self.pooled_side = math.ceil(self.feature_side / 2)  # the stock video pooling's output side (§3.2)
        self.pinpoints = [list(map(int, point)) for point in config.image_grid_pinpoints]
        self.max_tiles = max_tiles_of(config.vision_aspect_ratio)
        processor = self.processor
        # video frames are squashed to the tower's input and anyres tiles have its size: both processors must agree
        for name, sub in (("image", processor.image_processor), ("video", processor.video_processor)):
            if processor_size(sub) != (self.tile, self.tile):
                raise DecafError(f"{self.checkpoint}: the {name} processor resizes to {processor_size(sub)} but the "
                                 f"vision tower takes {self.tile}×{self.tile}")
        if [list(map(int, p)) for p in processor.image_processor.image_grid_pinpoints] != self.pinpoints:
            raise DecafError(f"{self.checkpoint}: image processor and model config have different "
                             "image_grid_pinpoints")
        self.image_token, self.video_token = processor.image_token, processor.video_token
        self.image_token_id, self.video_token_id = int(config.image_token_id), int(config.video_token_id)
        for token, token_id in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
            if self.tokenizer.convert_tokens_to_ids(token) != token_id:
                raise DecafError(f"{self.checkpoint}: tokenizer id of {token} differs from the config's {token_id}")
        if has_real_qwen2_vocab(self.tokenizer):  # the paper's checkpoint: assert SPEC §3.2's values
            found = {self.image_token: self.image_token_id, self.video_token: self.video_token_id}
            layout = (self.tile, self.feature_side, self.pooled_side)
            if found != PAPER_TOKEN_IDS or layout != (PAPER_TILE, PAPER_FEATURE_SIDE, PAPER_POOLED_SIDE):
                raise DecafError(f"{self.checkpoint}: expected token ids {PAPER_TOKEN_IDS} and tile/feature/pooled "
                                 f"sides 384/27/14 of llava-onevision-qwen2-7b-ov-hf, got {found} and {layout}")

    # ----- stock vision pieces --------------------------------------------------------------------------------
    def _tile_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 384, 384) → (N, 27², D): tower output at the configured layer and strategy, then the projector —
        the stock feature path before pooling/packing."""
        config = self.model.config
        outputs = self.model.model.vision_tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        layer = config.vision_feature_layer
        hidden = (outputs.hidden_states[layer] if isinstance(layer, int)
                  else torch.cat([outputs.hidden_states[i] for i in layer], dim=-1))
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.model.model.multi_modal_projector(hidden)

    def _embedded_batch(self, texts: list[str], features: torch.Tensor, token_id: int,
                        grid: tuple[int, int, int], extra: dict[str, Any]) -> VisualBatch:
        """Tokenise, then replace each row's placeholder embeddings by its features (B, n, D) in sequence order."""
        batch = self._batch(self.tokenizer(texts, return_tensors="pt", padding=True), [token_id], grid)
        ids = batch.inputs.pop("input_ids")
        embeds = self.model.get_input_embeddings()(ids)
        mask = batch.visual_mask.unsqueeze(-1).expand_as(embeds)
        batch.inputs["inputs_embeds"] = embeds.masked_scatter(mask, features.to(embeds.dtype))
        batch.extra.update(extra, input_ids=ids)  # the token ids stay available for checks and debugging
        return batch

    # ----- video level (calls 1, 4) ---------------------------------------------------------------------------
    @torch.inference_mode()
    def video_batch(self, frames: Sequence[Path], prompt: str) -> VisualBatch:
        """T frames squashed to 384², 27² features pooled bilinearly to 14² per frame, frame-major; no newline."""
        images = [load_rgb(path) for path in frames]
        pixels = self.processor.video_processor(videos=[images], do_sample_frames=False,
                                                return_tensors="pt")["pixel_values_videos"]
        if tuple(pixels.shape) != (1, len(frames), 3, self.tile, self.tile):
            raise RuntimeError(f"video processor gave {tuple(pixels.shape)}, expected {len(frames)} frames of "
                               f"{self.tile}²: it resampled or resized differently")
        features = self.model.model.apply_pooling(self._tile_features(pixels[0]))  # stock bilinear pooling
        if features.shape[1] != self.pooled_side ** 2:
            raise RuntimeError(f"stock pooling gave {features.shape[1]} tokens per frame, expected "
                               f"{self.pooled_side}²")
        grid = (len(frames), self.pooled_side, self.pooled_side)
        text = expand_placeholder(self.render(prompt, "video"), self.video_token,
                                  self.video_token * features.shape[0] * features.shape[1])
        return self._embedded_batch([text], features.flatten(0, 1)[None], self.video_token_id, grid,
                                    extra={"frame0_size": read_frame_size(frames[0])})

    # ----- frame level (calls 2, 5) ---------------------------------------------------------------------------
    def frame_layout(self, size_hw: tuple[int, int]) -> AnyresLayout:
        """Anyres tiles and map grid of a frame of (H, W) pixels (SPEC §3.2 table)."""
        return anyres_layout(size_hw, self.pinpoints, self.tile, self.feature_side, self.max_tiles)

    @torch.inference_mode()
    def frame_batch(self, frames: Sequence[Path], prompt: str, video: VisualBatch) -> VisualBatch:
        """Anyres tiles without the base image, unpadded (and anyres_max-downsized) by the stock packing, no newline
        column; the map (h, w) comes from frame 0 and every frame must match it."""
        frame0 = tuple(video.extra["frame0_size"])
        layout = self.frame_layout(frame0)
        rows, cols = layout.tiles
        processed = self.processor.image_processor([load_rgb(path) for path in frames], return_tensors="pt")
        sizes = processed["image_sizes"]
        for path, size in zip(frames, sizes.tolist()):
            if tuple(size) != frame0:  # the reference assumed one size (and so one tile count) for all frames
                raise DecafError(f"{path}: frame is {size[1]}x{size[0]} but frame 0 is {frame0[1]}x{frame0[0]}; "
                                 "every frame must give the same LLaVA-OV tile grid")
        pixels = processed["pixel_values"]  # (B, 1 + tiles, 3, 384, 384): the base image first, then the tiles
        if pixels.shape[1] != 1 + rows * cols:
            raise RuntimeError(f"image processor gave {pixels.shape[1] - 1} tiles, expected {rows}×{cols}")
        count = len(frames)
        tiles = self._tile_features(pixels[:, 1:].flatten(0, 1)).unflatten(0, (count, rows * cols))
        # The stock packing (unpad + anyres_max downsize) always reads patch 0 as the base image and prepends it to
        # its output; it gets a stand-in (tile 0) that is cut off again, and no newline embedding.
        base = self.feature_side ** 2
        packed, _ = self.model.model.pack_image_features(
            [torch.cat([features[:1], features]) for features in tiles], sizes, image_newline=None,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        features = torch.stack([row[base:] for row in packed])
        height, width = layout.grid
        if features.shape[1] != height * width:
            raise RuntimeError(f"stock packing gave {features.shape[1]} tokens per frame, but the anyres layout "
                               f"{layout} needs {height}·{width}")
        text = expand_placeholder(self.render(prompt, "image"), self.image_token, self.image_token * (height * width))
        return self._embedded_batch([text] * count, features, self.image_token_id, (1, height, width),
                                    extra={"layout": layout})
