"""Keypoints: the highest cells of Φ as (frame index, relative y, relative x, score) (SPEC §9.1–§9.2)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import torch

from model.utils.atomic import atomic_write_bytes
from model.utils.errors import DecafError

NUM_KEYPOINTS = 100
KEYPOINTS_FILE = "keypoints.pt"


def extract_keypoints(phi: torch.Tensor, key_frame_indices: Sequence[int], k: int = NUM_KEYPOINTS) -> torch.Tensor:
    """The top-``k`` cells of the whole clip as a (K, 4) float32 tensor, K = min(k, T·h_f·w_f) (SPEC §9.1).

    Rows are sorted by Φ descending; ties go to the smaller flat index (a stable sort; a SPEC decision, the
    reference's ``topk`` order is unspecified). Columns: k_t, (i + 0.5)/h_f, (j + 0.5)/w_f, Φ[t, i, j], in fp32.
    """
    if phi.dim() != 3:
        raise ValueError(f"expected Φ of shape (T, h, w), got {tuple(phi.shape)}")
    num_frames, height, width = phi.shape
    if len(key_frame_indices) != num_frames:
        raise DecafError(f"Φ has {num_frames} frames but {len(key_frame_indices)} key frame indices were given")
    flat = phi.detach().to("cpu", torch.float32).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    t = order // (height * width)
    i = (order % (height * width)) // width
    j = order % width
    frame_index = torch.tensor(list(key_frame_indices), dtype=torch.float32)[t]
    y_rel = (i.to(torch.float32) + 0.5) / height
    x_rel = (j.to(torch.float32) + 0.5) / width
    return torch.stack([frame_index, y_rel, x_rel, flat[order]], dim=1).contiguous()


def save_keypoints(path: str | os.PathLike, keypoints: torch.Tensor) -> Path:
    """Write ``keypoints.pt`` atomically with ``torch.save`` (SPEC §9.2, §12.6); loads with ``weights_only=True``."""
    if keypoints.dim() != 2 or keypoints.shape[1] != 4 or keypoints.dtype != torch.float32:
        raise ValueError(f"keypoints must be a (K, 4) float32 tensor, got {tuple(keypoints.shape)} {keypoints.dtype}")
    # serialised in memory: torch.save names its archive records after the file it writes (here a temporary
    # name), so the file would differ from run to run; in memory the bytes are reproducible
    buffer = io.BytesIO()
    torch.save(keypoints.detach().to("cpu").contiguous().clone(), buffer)
    return atomic_write_bytes(path, buffer.getvalue())
