"""Fused Triton kernels for the two hot loops of the streamed rollout (SPEC §5.8a).

Both kernels recompute attention scores tile by tile from the stored q and k, so no (H, L, L) tensor ever exists
(SPEC §5.8a "must not hold an H×L×L tensor"):

* :func:`attention_stats` — the stats pass of one captured layer: per query row and head, the log-sum-exp of the
  causal, pad-masked scores and the V-Max value m = max_{j∈V} P[h, i, j] = exp(max_{j∈V} S − lse) (SPEC §5.3).
* :func:`rollout_step` — one layer of the backward row-vector walk: out[b, h, j] = Σ_i v[b, i] · P[b, h, i, j]
  with P = exp(S − lse) recomputed on the fly (SPEC §5.8a); the head mix with ŵ happens in the caller.

Precision (SPEC §5.2, §5.5): the tiles multiply the stored bf16/fp16 q and k directly with fp32 accumulation.
Every product of two bf16 (8-bit mantissa) or fp16 (11-bit) numbers is exact in fp32, so this equals the fp32
matmul of the upcast values up to summation order; fp32 inputs use IEEE fp32 products (never TF32). Softmax,
masks and sums are fp32.

Padding (SPEC §5.6): pad keys are masked out of every softmax; a query row that sees no real key (a left pad row)
gets lse = +inf, so its probabilities are exactly 0 in the backward pass.
"""
from __future__ import annotations

from typing import Mapping

import torch
import triton
import triton.language as tl

#: default tile shapes (BLOCK_M query rows × BLOCK_N key columns), the fastest of a sweep on an H100 at head_dim 128
#: (benchmarks/bench_rollout_kernels.py --sweep); a caller may pass its own ``config``. The stats kernel needs
#: BLOCK_M to be a multiple of BLOCK_N (its unmasked key loop must stop exactly at the diagonal tile).
STATS_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
STEP_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


@triton.jit
def _scores_dot(a, b, FP32_INPUTS: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 inputs use IEEE products, never TF32 (SPEC §5.5)."""
    if FP32_INPUTS:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)  # bf16/fp16 products are exact in the fp32 accumulator


@triton.jit
def _stats_tile(q, k_ptrs, start_n, offs_m, offs_n0, d_mask, key_mask_row, visual_row, m_i, l_i, vmax, L, scale,
                stride_kl, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, FP32_INPUTS: tl.constexpr):
    """Fold one key tile into the online log-sum-exp (m_i, l_i) and the visual-column max of S (vmax)."""
    offs_n = start_n + offs_n0
    in_range = offs_n < L
    kt = tl.load(k_ptrs + start_n * stride_kl, mask=d_mask[:, None] & in_range[None, :], other=0.0)
    s = _scores_dot(q, kt, FP32_INPUTS) * scale
    if HAS_KEY_MASK:
        real_key = tl.load(key_mask_row + offs_n, mask=in_range, other=0) != 0
    # keys past L only occur on the diagonal tiles, where the causal mask (j ≤ i < L) already removes them
    if CAUSAL:
        valid = offs_n[None, :] <= offs_m[:, None]
        if HAS_KEY_MASK:
            valid = valid & real_key[None, :]
        s = tl.where(valid, s, float("-inf"))
    elif HAS_KEY_MASK:
        s = tl.where(real_key[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows that have seen no valid key yet keep m = -inf; shift them by 0 so exp() gives 0 instead of NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    is_visual = tl.load(visual_row + offs_n, mask=in_range, other=0) != 0
    vmax = tl.maximum(vmax, tl.max(tl.where(is_visual[None, :], s, float("-inf")), 1))
    return m_new, l_i, vmax


@triton.jit
def _stats_kernel(q_ptr, k_ptr, visual_ptr, key_mask_ptr, lse_ptr, vmax_ptr,
                  L, H, group, scale,
                  stride_qb, stride_qh, stride_ql, stride_qd,
                  stride_kb, stride_kh, stride_kl, stride_kd,
                  stride_mask_b,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_KEY_MASK: tl.constexpr, FP32_INPUTS: tl.constexpr):
    # the last query blocks see the most keys: launch them first so the tail of the grid is short
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_head = h // group  # GQA, SPEC §5.2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=(offs_m < L)[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = k_ptr + b * stride_kb + kv_head * stride_kh + offs_n0[None, :] * stride_kl + offs_d[:, None] * stride_kd
    key_mask_row = key_mask_ptr + b * stride_mask_b
    visual_row = visual_ptr + b * stride_mask_b

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    vmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
    diag_start = pid_m * BLOCK_M
    for start_n in range(0, diag_start, BLOCK_N):  # key tiles entirely below the diagonal: no causal mask
        m_i, l_i, vmax = _stats_tile(q, k_ptrs, start_n, offs_m, offs_n0, d_mask, key_mask_row, visual_row,
                                     m_i, l_i, vmax, L, scale, stride_kl, False, HAS_KEY_MASK, FP32_INPUTS)
    for start_n in range(diag_start, tl.minimum(diag_start + BLOCK_M, L), BLOCK_N):  # the diagonal tiles
        m_i, l_i, vmax = _stats_tile(q, k_ptrs, start_n, offs_m, offs_n0, d_mask, key_mask_row, visual_row,
                                     m_i, l_i, vmax, L, scale, stride_kl, True, HAS_KEY_MASK, FP32_INPUTS)

    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("inf"))  # no real key seen: P row is 0 (SPEC §5.6)
    m_visual = tl.exp(vmax - lse)  # 0 for rows before the first visual token (SPEC §5.3)
    out = bh.to(tl.int64) * L + offs_m
    tl.store(lse_ptr + out, lse, mask=offs_m < L)
    tl.store(vmax_ptr + out, m_visual, mask=offs_m < L)


@triton.jit
def _step_tile(k, q_ptrs, lse_row, v_row, start_m, offs_n, offs_m0, d_mask, acc, L, scale, stride_ql,
               CAUSAL: tl.constexpr, FP32_INPUTS: tl.constexpr):
    """Add Σ_i v_i · P[i, j] over one query tile to the key-block accumulator (scores transposed: keys × queries)."""
    offs_m = start_m + offs_m0
    in_range = offs_m < L
    v = tl.load(v_row + offs_m, mask=in_range, other=0.0)
    qt = tl.load(q_ptrs + start_m * stride_ql, mask=d_mask[:, None] & in_range[None, :], other=0.0)
    lse = tl.load(lse_row + offs_m, mask=in_range, other=float("inf"))
    s = _scores_dot(k, qt, FP32_INPUTS) * scale
    p = tl.exp(s - lse[None, :])
    if CAUSAL:
        p = tl.where(offs_n[:, None] <= offs_m[None, :], p, 0.0)
    return acc + tl.sum(p * v[None, :], 1)


@triton.jit
def _step_kernel(q_ptr, k_ptr, lse_ptr, v_ptr, v_span_ptr, key_mask_ptr, out_ptr,
                 L, H, group, scale,
                 stride_qb, stride_qh, stride_ql, stride_qd,
                 stride_kb, stride_kh, stride_kl, stride_kd,
                 stride_mask_b,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_KEY_MASK: tl.constexpr, FP32_INPUTS: tl.constexpr):
    # the first key blocks are seen by the most queries and are launched first
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_head = h // group  # GQA, SPEC §5.2

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    key_in_range = offs_n < L
    k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=key_in_range[:, None] & d_mask[None, :], other=0.0)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m0[None, :] * stride_ql + offs_d[:, None] * stride_qd
    lse_row = lse_ptr + bh.to(tl.int64) * L
    v_row = v_ptr + b * L
    # only query rows in [v_lo, v_hi] carry v ≠ 0; the first backward layer (v = e_query) thus costs one tile
    v_lo = (tl.load(v_span_ptr + 2 * b) // BLOCK_M) * BLOCK_M
    v_end = tl.minimum(tl.load(v_span_ptr + 2 * b + 1) + 1, L)

    acc = tl.zeros([BLOCK_N], tl.float32)
    first_m = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    diag_end = first_m + tl.cdiv(pid_n * BLOCK_N + BLOCK_N - first_m, BLOCK_M) * BLOCK_M
    for start_m in range(tl.maximum(first_m, v_lo), tl.minimum(diag_end, v_end), BLOCK_M):  # tiles on the diagonal
        acc = _step_tile(k, q_ptrs, lse_row, v_row, start_m, offs_n, offs_m0, d_mask, acc, L, scale, stride_ql,
                         True, FP32_INPUTS)
    for start_m in range(tl.maximum(diag_end, v_lo), v_end, BLOCK_M):  # query tiles entirely below it
        acc = _step_tile(k, q_ptrs, lse_row, v_row, start_m, offs_n, offs_m0, d_mask, acc, L, scale, stride_ql,
                         False, FP32_INPUTS)

    if HAS_KEY_MASK:  # pad keys were never part of any softmax (SPEC §5.6)
        real_key = tl.load(key_mask_ptr + b * stride_mask_b + offs_n, mask=key_in_range, other=0) != 0
        acc = tl.where(real_key, acc, 0.0)
    tl.store(out_ptr + bh.to(tl.int64) * L + offs_n, acc, mask=key_in_range)


def _launch_args(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None,
                 scale: float) -> tuple[torch.Tensor, tuple, dict]:
    """The key-mask pointer (a dummy when there is no padding) and the scalar/stride arguments of both kernels."""
    batch, heads, length, head_dim = q.shape
    mask = key_mask if key_mask is not None else torch.ones((batch, length), dtype=torch.int8, device=q.device)
    args = (length, heads, heads // k.shape[1], scale, *q.stride(), *k.stride(), mask.stride(0))
    meta = {"HEAD_DIM": head_dim, "D_PAD": max(16, triton.next_power_of_2(head_dim)),
            "HAS_KEY_MASK": key_mask is not None, "FP32_INPUTS": q.dtype == torch.float32}
    return mask, args, meta


def attention_stats(q: torch.Tensor, k: torch.Tensor, visual: torch.Tensor, key_mask: torch.Tensor | None,
                    scale: float, config: Mapping[str, int] = STATS_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query log-sum-exp and V-Max of one layer (SPEC §5.3, §5.8a).

    q: (B, H, L, d), k: (B, H_kv, L, d) as captured; visual, key_mask: (B, L) int8, contiguous (key_mask None
    without padding). Returns lse and m, both (B, H, L) fp32.
    """
    if config["BLOCK_M"] % config["BLOCK_N"]:
        raise ValueError(f"stats kernel needs BLOCK_M to be a multiple of BLOCK_N, got {dict(config)}")
    batch, heads, length, _ = q.shape
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    m_visual = torch.empty_like(lse)
    mask, args, meta = _launch_args(q, k, key_mask, scale)
    grid = (triton.cdiv(length, config["BLOCK_M"]), batch * heads)
    _stats_kernel[grid](q, k, visual, mask, lse, m_visual, *args, **meta, **config)
    return lse, m_visual


def rollout_step(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, v: torch.Tensor,
                 key_mask: torch.Tensor | None, scale: float,
                 config: Mapping[str, int] = STEP_CONFIG) -> torch.Tensor:
    """Per-head row-vector product out[b, h, :] = v[b] · P_h of one layer (SPEC §5.8a), P recomputed from q, k, lse.

    v: (B, L) fp32, contiguous, with at least one non-zero entry per row. Returns (B, H, L) fp32.
    """
    batch, heads, length, _ = q.shape
    out = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    positions = torch.arange(length, device=v.device)
    nonzero = v != 0
    v_span = torch.stack([torch.where(nonzero, positions, length).amin(dim=1),
                          torch.where(nonzero, positions, -1).amax(dim=1)], dim=1).to(torch.int32).contiguous()
    mask, args, meta = _launch_args(q, k, key_mask, scale)
    grid = (triton.cdiv(length, config["BLOCK_N"]), batch * heads)
    _step_kernel[grid](q, k, lse, v, v_span, mask, out, *args, **meta, **config)
    return out
