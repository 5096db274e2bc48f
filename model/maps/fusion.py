"""From raw rollout maps to the fused map Φ (SPEC §6).

Every step is the literal fp32 operation the SPEC lists (T2, §0.5), so that on CPU Φ is bit-identical to a
plain-loop implementation of the formulas. Two places where a library call would not be literal are spelled out:

* the Gaussian smoothing (§6.2) is a sum of shifted, weighted copies in a fixed tap order instead of
  ``F.conv2d``, whose accumulation order depends on the backend (and whose CUDA version may use TF32);
* the bilinear resize (§6.6, §7) computes PyTorch's ``align_corners=False`` formula with every product and sum
  rounded to fp32, because ``F.interpolate``'s CPU kernel fuses them into FMAs depending on the build.

The SPEC's "oracle" is therefore reproducible on any CPU; ``tests/test_fusion.py`` holds it.
"""
from __future__ import annotations

import functools
from typing import Any, Protocol

import torch

from model.utils.errors import DecafError, SettingError
from model.utils.paths import FUSION_MODES
from model.utils.precision import strict_fp32

#: Gaussian kernel sizes for video-level and frame-level maps (SPEC §6.2)
VIDEO_KERNEL_SIZE = 3
FRAME_KERNEL_SIZE = 7
GAUSSIAN_SIGMA = 1.0


@functools.lru_cache(maxsize=None)
def _gaussian_kernel_cpu(size: int, sigma: float) -> torch.Tensor:
    a = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32)
    kernel = torch.exp(-(a[:, None] ** 2 + a[None, :] ** 2) / torch.tensor(2 * sigma ** 2, dtype=torch.float32))
    # ΣK as a sequential row-major fp32 sum: a fixed order, so the kernel is the same on every machine.
    total = torch.zeros((), dtype=torch.float32)
    for value in kernel.flatten():
        total = total + value
    return kernel / total


def gaussian_kernel(size: int, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """The normalised (size, size) fp32 Gaussian kernel K of SPEC §6.2 (a fresh copy)."""
    return _gaussian_kernel_cpu(size, float(sigma)).clone()


def gaussian_smooth(maps: torch.Tensor, size: int, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """S_k of SPEC §6.2: 2-D cross-correlation of every (h, w) slice with K, zero padding ⌊k/2⌋, stride 1.

    Computed as Σ over taps (row-major) of K[di, dj] · X_padded[di:di+h, dj:dj+w], each product and partial sum
    rounded to fp32 — the plain-loop convolution, vectorised over pixels. No temporal smoothing.
    """
    if maps.dim() != 3:
        raise ValueError(f"expected a (t, h, w) map, got shape {tuple(maps.shape)}")
    x = maps.to(torch.float32)
    kernel = _gaussian_kernel_cpu(size, float(sigma)).tolist()
    pad = size // 2
    _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # zeros: values near the border are damped
    out = torch.zeros_like(x)
    for di in range(size):
        for dj in range(size):
            weight = torch.tensor(kernel[di][dj], dtype=torch.float32, device=x.device)
            out = out + weight * padded[:, di:di + height, dj:dj + width]
    return out


def contrast(obj: torch.Tensor, bg: torch.Tensor | None, size: int) -> torch.Tensor:
    """D = clamp(S_k(O) − S_k(B), 0, 1) (SPEC §6.3); without background (§6.7) D = clamp(S_k(O), 0, 1)."""
    smoothed = gaussian_smooth(obj, size)
    if bg is not None:
        smoothed = smoothed - gaussian_smooth(bg, size)
    return torch.clamp(smoothed, 0.0, 1.0)  # the upper clamp is inert in practice but kept (§6.3)


def norm(x: torch.Tensor) -> torch.Tensor:
    """SPEC §6.4 over the whole tensor: (X − min)/(max − min), or X − min (all zeros) for a constant map."""
    low, high = x.min(), x.max()
    shifted = x - low
    span = high - low
    return shifted / span if bool(span > 0) else shifted


def norm_per_frame(x: torch.Tensor) -> torch.Tensor:
    """SPEC §6.4 applied to every (h, w) slice of a (t, h, w) map separately."""
    return torch.stack([norm(slice_) for slice_ in x])


def align_time(video_map: torch.Tensor, num_frames: int) -> torch.Tensor:
    """SPEC §6.5: repeat the video map ×2 in time when t_v ≠ T; drop the extra slice for odd T."""
    if video_map.shape[0] == num_frames:
        return video_map
    aligned = video_map.repeat_interleave(2, dim=0)  # slot i serves frames 2i and 2i+1
    if aligned.shape[0] == num_frames + 1:
        aligned = aligned[:-1]  # odd T: the video input was padded with a copy of the last frame
    if aligned.shape[0] != num_frames:
        raise DecafError(f"video map has {video_map.shape[0]} time slots, which cannot serve {num_frames} frames "
                         f"(expected {num_frames} or {(num_frames + 1) // 2})")
    return aligned


def _linear_axis(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of one axis, PyTorch's ``align_corners=False`` rule in fp32.

    scale = in/out; src = scale·(d + 0.5) − 0.5 clamped at 0; i0 = min(⌊src⌋, in−1); i1 = i0 + (i0 < in−1);
    λ1 = clamp(src − i0, 0, 1); λ0 = 1 − λ1. Equal sizes copy (λ0 = 1, λ1 = 0), as PyTorch does.
    """
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    if in_size == out_size:
        index = torch.arange(out_size, device=device)
        return index, index, torch.ones_like(dst), torch.zeros_like(dst)
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = scale.to(device) * (dst + 0.5) - 0.5
    src = torch.clamp(src, min=0.0)
    i0 = torch.clamp(torch.floor(src).to(torch.int64), max=in_size - 1)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    lambda1 = torch.clamp(src - i0.to(torch.float32), 0.0, 1.0)
    lambda0 = 1.0 - lambda1
    return i0, i1, lambda0, lambda1


def bilinear_resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize every (h, w) slice of a (t, h, w) fp32 map to ``size`` = (H, W) (SPEC §6.6, §7.1).

    ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` semantics (half-pixel centres, edge
    clamping), evaluated as out = λ0ʰ·(λ0ʷ·x00 + λ1ʷ·x01) + λ1ʰ·(λ0ʷ·x10 + λ1ʷ·x11) with every operation rounded
    to fp32. The width pass is computed once per input row and reused by the output rows that share it; each
    output element still sees exactly the operations of the formula.
    """
    if maps.dim() != 3:
        raise ValueError(f"expected a (t, h, w) map, got shape {tuple(maps.shape)}")
    x = maps.to(torch.float32)
    out_h, out_w = int(size[0]), int(size[1])
    row0, row1, h_lambda0, h_lambda1 = _linear_axis(x.shape[1], out_h, x.device)
    col0, col1, w_lambda0, w_lambda1 = _linear_axis(x.shape[2], out_w, x.device)
    rows = x[:, :, col0] * w_lambda0 + x[:, :, col1] * w_lambda1  # (t, h, W): the width pass of each input row
    return rows[:, row0, :] * h_lambda0[:, None] + rows[:, row1, :] * h_lambda1[:, None]


def fuse_maps(obj_video: torch.Tensor, obj_frame: torch.Tensor, bg_video: torch.Tensor | None = None,
              bg_frame: torch.Tensor | None = None, *, key_frame_count: int, no_background: bool = False,
              fusion: str = "both") -> torch.Tensor:
    """Φ of SPEC §6.3–§6.7: a (T, h_f, w_f) fp32 tensor with values in [0, 1].

    ``obj_video``/``bg_video`` are (t_v, h_v, w_v), ``obj_frame``/``bg_frame`` are (T, h_f, w_f) raw rollout maps.
    ``no_background`` ignores the background maps (§6.7, they may then be None); ``fusion`` selects the levels
    that enter Φ (``both``, ``video`` or ``frame``).
    """
    if fusion not in FUSION_MODES:
        raise SettingError("fusion", f"must be one of {', '.join(FUSION_MODES)}, got {fusion!r}")
    if not no_background and (bg_video is None or bg_frame is None):
        raise DecafError("background maps are missing; pass --no_background to fuse object maps only")
    if no_background:
        bg_video = bg_frame = None
    for obj, bg, level in ((obj_video, bg_video, "video"), (obj_frame, bg_frame, "frame")):
        if obj.dim() != 3:
            raise DecafError(f"{level} map must be 3-D (t, h, w), got shape {tuple(obj.shape)}")
        if bg is not None and bg.shape != obj.shape:
            raise DecafError(f"object and background {level} maps differ in shape: "
                             f"{tuple(obj.shape)} vs {tuple(bg.shape)}")
    num_frames, frame_h, frame_w = obj_frame.shape
    if num_frames != key_frame_count:
        raise DecafError(f"frame maps hold {num_frames} frames but {key_frame_count} key frames are recorded")

    with strict_fp32(), torch.no_grad():
        if fusion != "frame":
            video = norm(contrast(obj_video, bg_video, VIDEO_KERNEL_SIZE))           # N_v, global (§6.4)
            video = bilinear_resize(align_time(video, num_frames), (frame_h, frame_w))  # U_v (§6.5, §6.6)
            if fusion == "video":
                return norm(video)
        frame = norm_per_frame(contrast(obj_frame, bg_frame, FRAME_KERNEL_SIZE))    # N_f, per frame (§6.4)
        if fusion == "frame":
            return norm(frame)
        return norm((video + frame) / 2)


class CachedMaps(Protocol):
    """What fusion reads of a stage-1 cache (:class:`model.cache.AttentionCache` is one)."""

    path: Any
    obj_video: torch.Tensor
    obj_frame: torch.Tensor
    bg_video: torch.Tensor | None
    bg_frame: torch.Tensor | None
    key_frame_indices: list[int]

    @property
    def has_background(self) -> bool: ...


def fuse_cache(cache: CachedMaps, *, no_background: bool = False, fusion: str = "both") -> torch.Tensor:
    """Φ of one validated cache file (SPEC §6); a cache without background maps needs ``no_background``."""
    if not cache.has_background and not no_background:
        raise DecafError(f"{cache.path} holds object maps only (an _obj-only cache); it is valid only with "
                         f"--no_background")
    try:
        return fuse_maps(cache.obj_video, cache.obj_frame, cache.bg_video, cache.bg_frame,
                         key_frame_count=len(cache.key_frame_indices), no_background=no_background,
                         fusion=fusion)
    except DecafError as exc:
        raise DecafError(f"{cache.path}: {exc}") from exc
