"""Φ (SPEC §6), coarse masks (§7) and keypoints (§9.1) against plain-loop fp32 oracles (T2: bit-identical on CPU).

The oracles below are written from the SPEC's formulas with numpy float32 scalars, one operation at a time, so
every product and sum is rounded to fp32 exactly as the formula reads. ``exp`` is the correctly rounded value
(float64 exp rounded to fp32), which is what PyTorch returns for the kernel's arguments.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.cache import load_cache, save_cache
from model.maps.coarse_masks import coarse_masks, quantise
from model.maps.fusion import bilinear_resize, fuse_cache, fuse_maps, gaussian_kernel, gaussian_smooth
from model.maps.keypoints import extract_keypoints, save_keypoints
from model.utils.errors import DecafError

f32 = np.float32


# ----------------------------------------------------------------------------------------------- oracles
def oracle_kernel(size: int, sigma: float = 1.0) -> np.ndarray:
    r = size // 2
    raw = np.zeros((size, size), f32)
    for i in range(size):
        for j in range(size):
            a_i, a_j = f32(i - r), f32(j - r)
            arg = -(a_i * a_i + a_j * a_j) / f32(2 * sigma * sigma)
            raw[i, j] = f32(math.exp(float(arg)))
    total = f32(0)
    for i in range(size):
        for j in range(size):
            total = f32(total + raw[i, j])
    return (raw / total).astype(f32)


def oracle_smooth(x: np.ndarray, size: int) -> np.ndarray:
    kernel, r = oracle_kernel(size), size // 2
    t_, h, w = x.shape
    out = np.zeros_like(x, dtype=f32)
    for t in range(t_):
        for y in range(h):
            for xx in range(w):
                acc = f32(0)
                for di in range(size):
                    for dj in range(size):
                        yy, xs = y + di - r, xx + dj - r
                        value = x[t, yy, xs] if (0 <= yy < h and 0 <= xs < w) else f32(0)  # zero padding
                        acc = f32(acc + f32(kernel[di, dj] * value))
                out[t, y, xx] = acc
    return out


def oracle_norm(x: np.ndarray) -> np.ndarray:
    low, high = f32(np.inf), f32(-np.inf)
    for v in x.flat:
        low, high = min(low, v), max(high, v)
    span = f32(high - low)
    out = np.empty_like(x)
    for idx, v in np.ndenumerate(x):
        out[idx] = f32(v - low) / span if span > 0 else f32(v - low)
    return out


def oracle_axis(in_size: int, out_size: int):
    """PyTorch's align_corners=False source indices and weights, one output index at a time."""
    rows = []
    scale = f32(in_size) / f32(out_size)
    for d in range(out_size):
        if in_size == out_size:
            rows.append((d, d, f32(1), f32(0)))
            continue
        src = f32(scale * f32(f32(d) + f32(0.5))) - f32(0.5)     # half-pixel centres
        src = max(src, f32(0))                                      # edge clamping
        i0 = min(int(math.floor(src)), in_size - 1)
        lam1 = min(max(f32(src - f32(i0)), f32(0)), f32(1))
        rows.append((i0, i0 + (1 if i0 < in_size - 1 else 0), f32(f32(1) - lam1), lam1))
    return rows


def oracle_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    t_, h, w = x.shape
    ys, xs = oracle_axis(h, out_h), oracle_axis(w, out_w)
    out = np.zeros((t_, out_h, out_w), f32)
    for t in range(t_):
        for i, (r0, r1, hl0, hl1) in enumerate(ys):
            for j, (c0, c1, wl0, wl1) in enumerate(xs):
                top = f32(f32(wl0 * x[t, r0, c0]) + f32(wl1 * x[t, r0, c1]))
                bottom = f32(f32(wl0 * x[t, r1, c0]) + f32(wl1 * x[t, r1, c1]))
                out[t, i, j] = f32(f32(hl0 * top) + f32(hl1 * bottom))
    return out


def oracle_phi(o_v, o_f, b_v=None, b_f=None, fusion="both"):
    """SPEC §6.3–§6.7 step by step; b_v/b_f None means --no_background."""
    def contrast(o, b, size):
        d = oracle_smooth(o, size) if b is None else (oracle_smooth(o, size) - oracle_smooth(b, size)).astype(f32)
        return np.clip(d, f32(0), f32(1)).astype(f32)

    T, h_f, w_f = o_f.shape
    n_v = oracle_norm(contrast(o_v, b_v, 3))
    if n_v.shape[0] != T:
        n_v = np.stack([n_v[t // 2] for t in range(T)])            # repeat ×2, odd T drops the extra slice
    u_v = oracle_resize(n_v, h_f, w_f)
    n_f = np.stack([oracle_norm(s) for s in contrast(o_f, b_f, 7)])
    if fusion == "video":
        return oracle_norm(u_v)
    if fusion == "frame":
        return oracle_norm(n_f)
    return oracle_norm(((u_v + n_f) / f32(2)).astype(f32))


def oracle_coarse(phi: np.ndarray, height: int, width: int) -> np.ndarray:
    up = oracle_resize(phi, height, width)
    out = np.zeros(up.shape, np.uint8)
    for t in range(up.shape[0]):
        img = np.zeros((height, width), np.uint8)
        for idx, v in np.ndenumerate(up[t]):
            img[idx] = int(f32(v * f32(255)))                        # truncation, not rounding
        level, _ = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        out[t] = np.where(img > level, 255, 0)
    return out


def oracle_keypoints(phi: np.ndarray, key_frames: list[int], k: int = 100) -> np.ndarray:
    t_, h, w = phi.shape
    cells = [(-float(v), n) for n, v in enumerate(phi.flat)]
    cells.sort()                                                      # value descending, then flat index ascending
    rows = []
    for _, n in cells[:k]:
        t, i, j = n // (h * w), (n % (h * w)) // w, n % w
        rows.append([f32(key_frames[t]), f32(f32(i) + f32(0.5)) / f32(h), f32(f32(j) + f32(0.5)) / f32(w),
                     phi[t, i, j]])
    return np.array(rows, dtype=f32)


# ------------------------------------------------------------------------------------------------ inputs
def rollout_maps(video_shape, frame_shape, seed=0, with_background=True):
    """Raw rollout-like magnitudes: small non-negative values with object/background overlap (some D clamp to 0)."""
    g = torch.Generator().manual_seed(seed)
    maps = {"obj_video": torch.rand(video_shape, generator=g) * 0.02,
            "obj_frame": torch.rand(frame_shape, generator=g) * 0.03}
    if with_background:
        maps["bg_video"] = torch.rand(video_shape, generator=g) * 0.01
        maps["bg_frame"] = torch.rand(frame_shape, generator=g) * 0.015
    return maps


SHAPES = {
    # Qwen: t_v = ⌈T/2⌉ and an exact 2× spatial upsampling; odd T drops the extra repeated slice
    "qwen_odd_T": ((3, 4, 7), (5, 8, 14)),
    "qwen_even_T": ((2, 3, 5), (4, 6, 10)),
    # LLaVA-OV / InternVL: t_v = T and a square video map stretched to the frame grid
    "llava_like": ((3, 6, 6), (3, 9, 16)),
    "internvl_like": ((2, 8, 8), (2, 16, 24)),
    "single_frame": ((1, 3, 3), (1, 6, 6)),
}


def np_maps(maps):
    return {k: v.numpy() for k, v in maps.items()}


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size", [3, 7])
def test_gaussian_kernel_matches_plain_loop(size):
    kernel = gaussian_kernel(size)
    assert kernel.dtype == torch.float32 and kernel.shape == (size, size)
    assert np.array_equal(kernel.numpy(), oracle_kernel(size))
    assert torch.equal(kernel, kernel.T) and abs(float(kernel.sum()) - 1) < 1e-6


@pytest.mark.parametrize("size", [3, 7])
def test_smoothing_is_zero_padded_correlation(size):
    x = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(size))
    smoothed = gaussian_smooth(x, size)
    assert smoothed.shape == x.shape and smoothed.dtype == torch.float32
    assert np.array_equal(smoothed.numpy(), oracle_smooth(x.numpy(), size))
    # the same operation as a library convolution (whose accumulation order differs in the last bits)
    conv = F.conv2d(x[:, None], gaussian_kernel(size)[None, None], padding=size // 2)[:, 0]
    torch.testing.assert_close(smoothed, conv, rtol=0, atol=1e-6)
    # zero padding damps the border of a constant map; the centre keeps its value
    ones = gaussian_smooth(torch.ones(1, 9, 9), size)
    assert float(ones[0, 0, 0]) < 0.6 and abs(float(ones[0, 4, 4]) - 1) < 1e-6


@pytest.mark.parametrize("src,dst", [((4, 7), (8, 14)), ((6, 6), (9, 16)), ((8, 8), (16, 24)), ((5, 7), (5, 7)),
                                     ((8, 14), (27, 48)), ((9, 16), (4, 5)), ((1, 1), (3, 2))])
def test_bilinear_resize_matches_explicit_formula(src, dst):
    x = torch.rand(2, *src, generator=torch.Generator().manual_seed(1))
    out = bilinear_resize(x, dst)
    assert np.array_equal(out.numpy(), oracle_resize(x.numpy(), *dst))
    ref = F.interpolate(x[:, None], size=dst, mode="bilinear", align_corners=False, antialias=False)[:, 0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)  # PyTorch's CPU kernel fuses into FMAs


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("fusion", ["both", "video", "frame"])
@pytest.mark.parametrize("no_background", [False, True])
def test_phi_bit_identical_to_oracle(name, fusion, no_background):
    video_shape, frame_shape = SHAPES[name]
    maps = rollout_maps(video_shape, frame_shape, seed=len(name))
    phi = fuse_maps(**maps, key_frame_count=frame_shape[0], no_background=no_background, fusion=fusion)
    m = np_maps(maps)
    expected = oracle_phi(m["obj_video"], m["obj_frame"], None if no_background else m["bg_video"],
                          None if no_background else m["bg_frame"], fusion=fusion)
    assert phi.dtype == torch.float32 and tuple(phi.shape) == frame_shape
    assert np.array_equal(phi.numpy(), expected)
    assert float(phi.min()) == 0.0 and float(phi.max()) == 1.0


def test_no_background_ignores_background_and_accepts_none():
    maps = rollout_maps(*SHAPES["qwen_odd_T"])
    with_bg = fuse_maps(**maps, key_frame_count=5, no_background=True)
    without = fuse_maps(maps["obj_video"], maps["obj_frame"], key_frame_count=5, no_background=True)
    assert torch.equal(with_bg, without)
    assert not torch.equal(with_bg, fuse_maps(**maps, key_frame_count=5))
    with pytest.raises(DecafError, match="--no_background"):
        fuse_maps(maps["obj_video"], maps["obj_frame"], key_frame_count=5)


def test_constant_maps_become_zero_without_nan():
    video, frame = torch.full((3, 4, 7), 0.01), torch.full((5, 8, 14), 0.02)
    phi = fuse_maps(video, frame, video.clone(), frame.clone(), key_frame_count=5)  # O = B → D ≡ 0
    assert not torch.isnan(phi).any() and torch.equal(phi, torch.zeros(5, 8, 14))
    # a constant frame slice is normalised to 0 on its own, the other frames are unaffected
    maps = rollout_maps((3, 4, 7), (5, 8, 14))
    maps["obj_frame"][2] = maps["bg_frame"][2]
    phi = fuse_maps(**maps, key_frame_count=5, fusion="frame")
    assert not torch.isnan(phi).any() and float(phi[2].abs().max()) == 0.0 and float(phi.max()) == 1.0


def test_shape_errors_are_user_errors():
    maps = rollout_maps((3, 4, 7), (5, 8, 14))
    with pytest.raises(DecafError, match="6 key frames"):
        fuse_maps(**maps, key_frame_count=6)
    with pytest.raises(DecafError, match="time slots"):
        fuse_maps(*rollout_maps((2, 4, 7), (5, 8, 14)).values(), key_frame_count=5)
    bad = dict(maps, bg_frame=torch.rand(5, 8, 13))
    with pytest.raises(DecafError, match="differ in shape"):
        fuse_maps(**bad, key_frame_count=5)
    with pytest.raises(DecafError, match="^fusion must be one of"):
        fuse_maps(**maps, key_frame_count=5, fusion="late")


def _cache_meta(key_frames, frames_count, video_grid, frame_grid):
    return {"family": "qwen2_5_vl", "checkpoint": "Qwen/Qwen2.5-VL-7B-Instruct", "num_layers": 28,
            "layer_start": 14, "layer_end": 28, "num_input_frames": 16, "frames_count": frames_count,
            "key_frame_indices": key_frames, "frame0_size": [135, 240], "video_grid": list(video_grid),
            "frame_grid": list(frame_grid), "tiling": None}


def test_fuse_cache_reads_the_file(tmp_path: Path):
    maps = rollout_maps((3, 4, 7), (5, 8, 14))
    meta = _cache_meta([0, 1, 2, 3, 4], 5, (3, 4, 7), (5, 8, 14))
    full = load_cache(save_cache(tmp_path / "v_0.safetensors", maps, meta))
    assert torch.equal(fuse_cache(full), fuse_maps(**maps, key_frame_count=5))
    assert torch.equal(fuse_cache(full, fusion="video", no_background=True),
                       fuse_maps(**maps, key_frame_count=5, fusion="video", no_background=True))
    obj_only = {k: maps[k] for k in ("obj_video", "obj_frame")}
    path = save_cache(tmp_path / "v_1.safetensors", obj_only, meta)
    with pytest.raises(DecafError, match="v_1.safetensors.*--no_background"):
        fuse_cache(load_cache(path))
    assert torch.equal(fuse_cache(load_cache(path), no_background=True),
                       fuse_maps(**obj_only, key_frame_count=5, no_background=True))


def test_coarse_masks_bit_identical_to_oracle():
    maps = rollout_maps((3, 4, 7), (5, 8, 14), seed=3)
    phi = fuse_maps(**maps, key_frame_count=5)
    masks = coarse_masks(phi, (27, 50))
    assert masks.dtype == np.uint8 and masks.shape == (5, 27, 50)
    assert set(np.unique(masks)) <= {0, 255}
    assert np.array_equal(masks, oracle_coarse(phi.numpy(), 27, 50))
    # Otsu is per frame: a frame of constant Φ gets no foreground, the others are unaffected
    phi[1] = 0.0
    again = coarse_masks(phi, (27, 50))
    assert not again[1].any() and np.array_equal(np.delete(again, 1, 0), np.delete(masks, 1, 0))


def test_quantisation_truncates():
    values = torch.tensor([[0.0, 0.5, 1.0], [0.999, 0.0039, 0.00393]])
    assert quantise(values).tolist() == [[0, 127, 255], [254, 0, 1]]


def test_keypoints_match_oracle_with_ties(tmp_path: Path):
    maps = rollout_maps((3, 4, 7), (5, 8, 14), seed=5)
    phi = fuse_maps(**maps, key_frame_count=5) * 0.5
    phi[4, 7, 13] = phi[0, 0, 0] = phi[2, 3, 3] = 1.0  # ties at the top: ascending flat index wins
    key_frames = [0, 3, 7, 10, 14]
    keypoints = extract_keypoints(phi, key_frames)
    assert keypoints.dtype == torch.float32 and keypoints.shape == (100, 4)
    assert np.array_equal(keypoints.numpy(), oracle_keypoints(phi.numpy(), key_frames))
    assert keypoints[:3, 0].tolist() == [0.0, 7.0, 14.0]
    small = extract_keypoints(phi[:1, :4, :5], [0])  # fewer cells than 100: all of them
    assert small.shape == (20, 4) and np.array_equal(small.numpy(), oracle_keypoints(phi[:1, :4, :5].numpy(), [0]))

    path = save_keypoints(tmp_path / "exp" / "keypoints.pt", keypoints)
    assert torch.equal(torch.load(path, weights_only=True), keypoints)
    assert [p.name for p in path.parent.iterdir()] == ["keypoints.pt"]
    with pytest.raises(DecafError, match="key frame"):
        extract_keypoints(phi, [0, 1])
