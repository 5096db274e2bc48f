"""InternVL3-hf inputs and token grids (SPEC §3.3).

Video: the stock processor squashes each frame to one 448² tile and writes ``FrameN: <img>…</img>`` per frame, so
the visual tokens are not contiguous; V is the exact set of ``<IMG_CONTEXT>`` positions. Frames: the stock
processor appends a thumbnail tile whenever it tiles, and offers no switch for it, so the adapter tiles itself with
the library's own ``get_optimal_tiled_canvas``: the image processor resizes the whole frame to the
(rows·448) × (cols·448) canvas (its resize, as in its own cropping) and normalises it, and the adapter cuts the
canvas into row-major 448² tiles. The tiles are bit-identical to the stock crops, without the thumbnail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from model.adapters.base import (MLLMAdapter, VisualBatch, expand_placeholder, has_real_qwen2_vocab, load_rgb,
                                 processor_size)
from model.utils.errors import DecafError, SettingError
from model.utils.video import read_frame_size

#: paper checkpoints (InternVL3-2B/8B/14B-hf) [ckpt], asserted when the real vocabulary is loaded
PAPER_CONTEXT_TOKEN_ID = 151667
PAPER_TILE, PAPER_TILE_GRID = (448, 448), (16, 16)


def tile_grid_of(image_size: tuple[int, int], patch_size: tuple[int, int], downsample_ratio: float) -> tuple[int, int]:
    """Tokens per tile side: image_size / patch_size · downsample_ratio, which must be whole (SPEC §3.3)."""
    grid = []
    for size, patch in zip(image_size, patch_size):
        side = size / patch * downsample_ratio
        if size % patch or side != int(side):
            raise DecafError(f"InternVL tile {image_size} with patch {patch_size} and pixel-shuffle ratio "
                             f"{downsample_ratio} does not give a whole token grid")
        grid.append(int(side))
    return grid[0], grid[1]


def frame_tiling(size_hw: tuple[int, int], tile_hw: tuple[int, int], max_patches: int) -> tuple[int, int]:
    """(rows, cols) of tiles for a frame of (H, W): the library's ``get_optimal_tiled_canvas`` with 1…max tiles.

    >>> frame_tiling((480, 854), (448, 448), 12)
    (1, 2)
    """
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas(tuple(size_hw), tuple(tile_hw), 1, max_patches)
    return rows, cols


#: the system turn this family's reference passes explicitly (SPEC §4.4)
SYS_INTERNVL = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

class InternVLAdapter(MLLMAdapter):
    """InternVL3-2B/8B/14B-hf (``model_type`` internvl), SPEC §3.3."""

    family = "internvl"
    model_types = {"internvl": "internvl"}
    system_message = SYS_INTERNVL  # passed explicitly (§4.4)
    #: the published InternVL3-hf processors are the fast GotOcr2ImageProcessorFast, which the paper's library loaded
    default_image_processor = "fast"

    def _model_class(self) -> type:
        from transformers import InternVLForConditionalGeneration
        return InternVLForConditionalGeneration

    def _config_overrides(self, config: dict[str, Any]) -> dict[str, Any]:
        """``tie_word_embeddings`` from the LLM's config where the top level has none (InternVL3-hf).

        The published configs set it only in ``text_config`` (false: the files hold a separate ``lm_head``); the
        library then assumes the class default (tied), finds two different tensors, keeps them untied and warns on
        every load. Saying what the LLM's config says loads the same weights without that warning.
        """
        text_config = config.get("text_config") or {}
        if "tie_word_embeddings" in config or "tie_word_embeddings" not in text_config:
            return {}
        return {"tie_word_embeddings": bool(text_config["tie_word_embeddings"])}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.options.max_patches < 1:
            raise SettingError("max_patches", f"must be at least 1, got {self.options.max_patches}")
        config = self.model.config
        vision = config.vision_config
        self.tile = tuple(int(v) for v in vision.image_size)
        self.tile_grid = tile_grid_of(self.tile, tuple(int(v) for v in vision.patch_size),
                                      float(config.downsample_ratio))
        tokens_per_tile = self.tile_grid[0] * self.tile_grid[1]
        processor = self.processor
        if int(processor.image_seq_length) != tokens_per_tile:
            raise DecafError(f"{self.checkpoint}: processor image_seq_length {processor.image_seq_length} differs "
                             f"from the {self.tile_grid} grid per tile of the model config")
        # The video size comes from the checkpoint's video processor config; the class default (384) would not
        # match the tower, so check it rather than trust it (§3.3).
        for name, sub in (("image", processor.image_processor), ("video", processor.video_processor)):
            if processor_size(sub) != self.tile:
                raise DecafError(f"{self.checkpoint}: the {name} processor resizes to {processor_size(sub)} but "
                                 f"the vision tower takes {self.tile} tiles")
        self.context_token = processor.image_token  # <IMG_CONTEXT>: the only visual token (§3.3)
        self.image_token_id = int(config.image_token_id)
        if self.tokenizer.convert_tokens_to_ids(self.context_token) != self.image_token_id:
            raise DecafError(f"{self.checkpoint}: tokenizer id of {self.context_token} differs from the config's "
                             f"{self.image_token_id}")
        if has_real_qwen2_vocab(self.tokenizer) and (self.image_token_id, self.tile, self.tile_grid) != (
                PAPER_CONTEXT_TOKEN_ID, PAPER_TILE, PAPER_TILE_GRID):
            raise DecafError(f"{self.checkpoint}: expected <IMG_CONTEXT> {PAPER_CONTEXT_TOKEN_ID}, 448² tiles and a "
                             f"16×16 grid per tile as in InternVL3-hf, got {self.image_token_id}, {self.tile}, "
                             f"{self.tile_grid}")

    # ----- video level (calls 1, 4) ---------------------------------------------------------------------------
    def video_batch(self, frames: Sequence[Path], prompt: str) -> VisualBatch:
        """One 448² tile per frame (squashed), 256 tokens each inside ``FrameN: <img>…</img>`` (§3.3)."""
        images = [load_rgb(path) for path in frames]
        inputs = self.processor(text=[self.render(prompt, "video")], videos=[images], do_sample_frames=False,
                                return_tensors="pt")
        if tuple(inputs["pixel_values"].shape) != (len(frames), 3, *self.tile):
            raise RuntimeError(f"processor gave video pixels {tuple(inputs['pixel_values'].shape)}, expected "
                               f"{len(frames)} frames of {self.tile}: it resampled or resized differently")
        batch = self._batch(inputs, [self.image_token_id], (len(frames), *self.tile_grid))
        batch.extra["tiling"] = self.frame_tiling(read_frame_size(frames[0]))  # frame 0 decides (§3.3)
        return batch

    # ----- frame level (calls 2, 5) ---------------------------------------------------------------------------
    def frame_tiling(self, size_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of a frame of (H, W) pixels with ``--max_patches`` (§3.3 examples)."""
        return frame_tiling(size_hw, self.tile, self.options.max_patches)

    def frame_batch(self, frames: Sequence[Path], prompt: str, video: VisualBatch) -> VisualBatch:
        """rows·cols tiles per frame, no thumbnail, rows·cols·256 ``<IMG_CONTEXT>`` tokens inside ``<img>…</img>``."""
        rows, cols = video.extra["tiling"]
        for path in frames:
            if self.frame_tiling(read_frame_size(path)) != (rows, cols):
                raise DecafError(f"{path}: frame tiles differently from frame 0 ({rows}×{cols} tiles); every frame "
                                 "must give the same InternVL tile grid")
        tile_h, tile_w = self.tile
        canvas = self.processor.image_processor(
            [load_rgb(path) for path in frames], crop_to_patches=False,
            size={"height": rows * tile_h, "width": cols * tile_w}, return_tensors="pt")["pixel_values"]
        # (B, 3, rows·th, cols·tw) → (B·rows·cols, 3, th, tw), tiles row-major within each frame
        tiles = (canvas.unflatten(2, (rows, tile_h)).unflatten(4, (cols, tile_w))
                 .permute(0, 2, 4, 1, 3, 5).reshape(-1, canvas.shape[1], tile_h, tile_w))
        count = rows * cols * self.tile_grid[0] * self.tile_grid[1]
        processor = self.processor
        text = expand_placeholder(self.render(prompt, "image"), self.context_token,
                                  processor.start_image_token + self.context_token * count + processor.end_image_token)
        inputs = dict(self.tokenizer([text] * len(frames), return_tensors="pt", padding=True))
        inputs["pixel_values"] = tiles
        grid = (1, rows * self.tile_grid[0], cols * self.tile_grid[1])
        return self._batch(inputs, [self.image_token_id], grid, tiling=(rows, cols))

    def row_map(self, values: torch.Tensor, batch: VisualBatch) -> torch.Tensor:
        """Video: row-major (T, 16, 16). Frames: ``t (th tw) (gh gw) -> t (th gh) (tw gw)`` (SPEC §6.1)."""
        if batch.tiling is None:
            return values.reshape(batch.grid)
        rows, cols = batch.tiling
        grid_h, grid_w = self.tile_grid
        return values.reshape(rows, cols, grid_h, grid_w).permute(0, 2, 1, 3).reshape(batch.grid)
