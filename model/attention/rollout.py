"""Attention rollout with V-Max head weighting: the math of SPEC §5.2–§5.6 and its streamed form §5.8a.

The capture engine feeds one captured decoder layer at a time (:meth:`Rollout.add_layer`, increasing layer order,
post-RoPE q and k as the model's attention function receives them) and reads the rollout rows once at the end
(:meth:`Rollout.rows`). Two implementations:

* ``literal`` — the oracle of SPEC §0.5: full (B, H, L, L) probabilities per layer with a fresh causal mask,
  left-multiplied L×L rollout matrices. For tests and small inputs only.
* ``streamed`` — the production path, SPEC §5.8a: keeps q and k as produced plus per-query log-sum-exp and the
  head weights, then walks the layers backward with a row vector, recomputing P chunk by chunk. It never holds an
  H×L×L tensor. On CUDA it uses the fused Triton kernels of :mod:`model.attention.kernels`; everywhere else (or when
  forced) a chunked PyTorch implementation whose fp32 score chunk is bounded by ``chunk_bytes``.

Both compute in fp32 with TF32 disabled (SPEC §0.6, §5.5). ``dtype=torch.bfloat16`` is the opt-in
``--rollout_dtype bf16`` extension: scores, probabilities and the rollout products are then rounded to bf16 (the
reference README's "bf16 rollout"); it runs on the PyTorch path only.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from model.utils.errors import DecafError
from model.utils.precision import strict_fp32

ROLLOUT_IMPLS = ("literal", "streamed")
KERNELS = ("auto", "torch", "triton")
ROLLOUT_DTYPES = (torch.float32, torch.bfloat16)
#: captured q/k dtypes the Triton kernels accept (the tiles multiply them without an upcast copy)
KERNEL_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: bound on one fp32 score chunk S (B, H, C, L) of the PyTorch streamed path (SPEC §5.8a)
DEFAULT_CHUNK_BYTES = 256 * 2**20


class Rollout(Protocol):
    """What the capture engine drives: one call per captured layer, then the rollout rows."""

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One captured decoder layer, in increasing layer order. q: (B, H, L, d), k: (B, H_kv, L, d): post-RoPE as
        the model's attention function receives them (bf16/fp16/fp32, any device). GQA: query head h uses key head
        h // (H // H_kv)."""

    def rows(self) -> torch.Tensor:
        """(B, L) fp32 rollout rows r (SPEC §5.4), after all layers were added; row b's query is its last real
        token."""


def make_rollout(impl: str, visual_mask: torch.Tensor, key_mask: torch.Tensor | None = None, *,
                 scaling: float | None = None, dtype: torch.dtype = torch.float32, kernel: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Rollout:
    """Build a rollout accumulator for one batch of sequences.

    impl: "literal" (oracle, SPEC §5.2–§5.4) or "streamed" (SPEC §5.8a).
    visual_mask: (B, L) bool, the EXACT visual-token positions V of each row (SPEC §5.3).
    key_mask: (B, L) bool, True = real token (None = no padding). With padding (SPEC §5.6) pad keys are masked out of
      the softmax, each row's query is its last real token, head weights average over that row's real positions
      only, and each row uses its own V. Padding may be on either side.
    scaling: softmax scale; None = 1/sqrt(d) (SPEC §5.2).
    dtype: torch.float32 (faithful, default) or torch.bfloat16 (opt-in ``--rollout_dtype bf16``).
    kernel: streamed only — "auto" (Triton on CUDA tensors when triton imports and dtype is fp32, else PyTorch),
      "torch" or "triton" (forced; an error where it cannot run).
    chunk_bytes: streamed PyTorch path only — the budget of one fp32 score chunk (B, H, C, L).
    """
    if impl not in ROLLOUT_IMPLS:
        raise DecafError(f"unknown rollout implementation {impl!r}; choose one of {', '.join(ROLLOUT_IMPLS)}")
    if kernel not in KERNELS:
        raise DecafError(f"unknown rollout kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if dtype not in ROLLOUT_DTYPES:
        raise DecafError(f"rollout dtype {dtype} is not supported; use torch.float32 (faithful) or torch.bfloat16")
    if scaling is not None and not (math.isfinite(scaling) and scaling > 0):
        raise DecafError(f"softmax scaling must be a positive finite number, got {scaling!r}")
    rows = _RowMasks.build(visual_mask, key_mask)
    if impl == "literal":
        if kernel == "triton":
            raise DecafError("the literal rollout is plain PyTorch; kernel='triton' applies to impl='streamed' only")
        return LiteralRollout(rows, scaling, dtype)
    if chunk_bytes <= 0:
        raise DecafError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if kernel == "triton" and dtype != torch.float32:
        raise DecafError("the Triton rollout kernels compute in fp32 only; use kernel='torch' for a bf16 rollout")
    return StreamedRollout(rows, scaling, dtype, kernel, chunk_bytes)


@dataclass(frozen=True)
class _RowMasks:
    """Per-row token sets of one batch (SPEC §5.3, §5.6), validated once."""

    visual: torch.Tensor  # (B, L) bool: V of each row
    real: torch.Tensor  # (B, L) bool: real (non-pad) tokens
    query: torch.Tensor  # (B,) int64: each row's last real token, its query (SPEC §4.6, §5.6)
    padded: bool  # whether any pad token exists; without padding the fresh causal mask alone applies (§5.2)

    @classmethod
    def build(cls, visual_mask: torch.Tensor, key_mask: torch.Tensor | None) -> _RowMasks:
        if not isinstance(visual_mask, torch.Tensor) or visual_mask.dim() != 2 or visual_mask.dtype != torch.bool:
            raise DecafError("visual_mask must be a (B, L) bool tensor marking the visual-token positions")
        batch, length = visual_mask.shape
        if batch == 0 or length == 0:
            raise DecafError(f"visual_mask has an empty shape {tuple(visual_mask.shape)}")
        if key_mask is None:
            real = torch.ones_like(visual_mask)
        else:
            if key_mask.shape != visual_mask.shape or key_mask.dtype != torch.bool:
                raise DecafError(f"key_mask must be a bool tensor of the visual_mask's shape {(batch, length)}, got "
                                 f"{key_mask.dtype} {tuple(key_mask.shape)}")
            real = key_mask.to(visual_mask.device)
        # one device sync for all rows: which rows lack real tokens, lack visual tokens, or mark pads as visual
        problems = torch.stack([~real.any(dim=1), ~visual_mask.any(dim=1), (visual_mask & ~real).any(dim=1)]).tolist()
        for b in range(batch):
            if problems[0][b]:
                raise DecafError(f"batch row {b} has no real token in key_mask")
            if problems[1][b]:
                raise DecafError(f"batch row {b} has no visual token: V-Max head weights (SPEC §5.3) need one")
            if problems[2][b]:
                raise DecafError(f"batch row {b} marks pad positions as visual tokens")
        positions = torch.arange(length, device=real.device)
        query = torch.where(real, positions, -1).amax(dim=1)
        return cls(visual_mask, real, query, key_mask is not None and not bool(real.all()))

    def to(self, device: torch.device) -> _RowMasks:
        if self.visual.device == device:
            return self
        return _RowMasks(self.visual.to(device), self.real.to(device), self.query.to(device), self.padded)

    def check_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Validate one captured layer's q and k against the batch (shapes, GQA grouping, dtype, device)."""
        batch, length = self.visual.shape
        if q.dim() != 4 or k.dim() != 4:
            raise DecafError(f"captured q and k must be 4-D (B, H, L, d), got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[0] != batch or q.shape[2] != length:
            raise DecafError(f"captured q has shape {tuple(q.shape)} but the masks describe B={batch}, L={length}")
        if k.shape[0] != batch or k.shape[2] != length or k.shape[3] != q.shape[3]:
            raise DecafError(f"captured k has shape {tuple(k.shape)}, expected ({batch}, H_kv, {length}, "
                             f"{q.shape[3]})")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise DecafError(f"query heads ({q.shape[1]}) are not a multiple of key heads ({k.shape[1]})")
        if not q.is_floating_point() or q.dtype != k.dtype or q.device != k.device:
            raise DecafError(f"captured q and k must be floating tensors of one dtype on one device, got {q.dtype} on"
                             f" {q.device} and {k.dtype} on {k.device}")

    def head_weights(self, m: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
        """ŵ (B, H) from the V-Max values m (B, H, L) (SPEC §5.3): mean over the row's real queries (all L without
        padding), then divided by the best head's value."""
        real = self.real.to(accumulate)
        w = (m.to(accumulate) * real[:, None, :]).sum(dim=-1) / real.sum(dim=-1)[:, None]
        return w / w.amax(dim=-1, keepdim=True)


def _softmax_scale(scaling: float | None, head_dim: int) -> float:
    """The multiplier of q·k (SPEC §5.2): the module's scaling, or 1/sqrt(d)."""
    return 1.0 / math.sqrt(head_dim) if scaling is None else scaling


class LiteralRollout:
    """The paper-literal oracle (SPEC §0.5, §5.2–§5.4): (B, H, L, L) probabilities and an L×L product per row."""

    kernel_used = "literal"

    def __init__(self, masks: _RowMasks, scaling: float | None, dtype: torch.dtype) -> None:
        self._masks = masks
        self._scaling = scaling
        self._dtype = dtype
        self._product: torch.Tensor | None = None  # P_l of SPEC §5.4, (B, L, L)

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self._masks.check_layer(q, k)
        self._masks = masks = self._masks.to(q.device)
        heads, length, head_dim = q.shape[1:]
        with strict_fp32():
            # SPEC §5.2: upcast, repeat each key head H/H_kv times consecutively, scaled scores
            qf = q.to(self._dtype)
            kf = k.to(self._dtype).repeat_interleave(heads // k.shape[1], dim=1)
            scores = qf @ kf.transpose(-1, -2)
            scores = scores / math.sqrt(head_dim) if self._scaling is None else scores * self._scaling
            # fresh causal mask; pad keys out (SPEC §5.6)
            causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            allowed = causal[None, None] & masks.real[:, None, None, :]
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, 0.0)  # left-pad query rows see no key
            # SPEC §5.3: m = max over V columns (entries j > i are 0, so m = 0 for rows before min V)
            m = probs.masked_fill(~masks.visual[:, None, None, :], 0.0).amax(dim=-1)
            w_hat = masks.head_weights(m, self._dtype)
            mean_attention = (w_hat[:, :, None, None] * probs).sum(dim=1) / heads  # divide by H, not Σŵ
            # SPEC §5.4: R_l = 0.5 Ā_l + 0.5 I; new layer multiplies on the left
            identity = torch.eye(length, dtype=self._dtype, device=q.device)
            rollout = 0.5 * mean_attention + 0.5 * identity
            self._product = rollout if self._product is None else rollout @ self._product

    def rows(self) -> torch.Tensor:
        if self._product is None:
            raise DecafError("rollout rows requested before any layer was added")
        batch_rows = torch.arange(self._product.shape[0], device=self._product.device)
        return self._product[batch_rows, self._masks.query].float()


@dataclass
class _CapturedLayer:
    """What the streamed rollout keeps per layer (SPEC §5.8a): q and k as produced, lse, and ŵ."""

    q: torch.Tensor  # (B, H, L, d), dtype as captured
    k: torch.Tensor  # (B, H_kv, L, d)
    lse: torch.Tensor  # (B, H, L) fp32; +inf on rows that see no real key
    w_hat: torch.Tensor  # (B, H) fp64


class StreamedRollout:
    """Row-vector rollout (SPEC §5.8a): stats while capturing, a backward walk over the layers in :meth:`rows`."""

    def __init__(self, masks: _RowMasks, scaling: float | None, dtype: torch.dtype, kernel: str,
                 chunk_bytes: int) -> None:
        self._masks = masks
        self._scaling = scaling
        self._dtype = dtype
        self._kernel = kernel
        self._chunk_bytes = chunk_bytes
        self._layers: list[_CapturedLayer] = []
        self._kernels = None  # the imported model.attention.kernels once the Triton path is chosen
        self._kernel_masks: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def kernel_used(self) -> str | None:
        """"triton" or "torch" once the first layer chose the path (fixed for the whole batch), else None."""
        if not self._layers:
            return None
        return "triton" if self._kernels is not None else "torch"

    def add_layer(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self._masks.check_layer(q, k)
        if self._layers:
            first = self._layers[0]
            if q.shape != first.q.shape or k.shape != first.k.shape or q.device != first.q.device:
                raise DecafError(f"captured layer {len(self._layers)} has q {tuple(q.shape)} / k {tuple(k.shape)} "
                                 f"on {q.device}, unlike the first layer's {tuple(first.q.shape)} / "
                                 f"{tuple(first.k.shape)} on {first.q.device}")
        else:
            self._choose_kernel(q)
        self._masks = masks = self._masks.to(q.device)  # moved once: every layer lives on one device
        scale = _softmax_scale(self._scaling, q.shape[-1])
        q, k = q.detach(), k.detach()  # keep as produced: no upcast copy is stored
        with strict_fp32():
            if self._kernels is not None:
                visual, real = self._masks_for_kernels(masks)
                lse, m = self._kernels.attention_stats(q, k, visual, real, scale)
            else:
                lse, m = self._torch_stats(q, k, masks, scale)
            w_hat = masks.head_weights(m, torch.float64)  # long mean over L in fp64 (costs nothing)
        self._layers.append(_CapturedLayer(q, k, lse, w_hat))

    def rows(self) -> torch.Tensor:
        if not self._layers:
            raise DecafError("rollout rows requested before any layer was added")
        first = self._layers[0]
        batch, heads, length, _ = first.q.shape
        masks = self._masks
        scale = _softmax_scale(self._scaling, first.q.shape[-1])
        with strict_fp32():
            # SPEC §5.8a: r = e_query · R_{end-1} ⋯ R_start, evaluated right to left as a row vector
            v = torch.zeros((batch, length), dtype=torch.float64, device=first.q.device)
            v[torch.arange(batch, device=v.device), masks.query] = 1.0
            for layer in reversed(self._layers):
                if self._kernels is not None:
                    _, real = self._masks_for_kernels(masks)
                    per_head = self._kernels.rollout_step(layer.q, layer.k, layer.lse, v.float().contiguous(), real,
                                                          scale)
                else:
                    per_head = self._torch_step(layer, v, masks, scale)
                u = (layer.w_hat[:, :, None] * per_head.double()).sum(dim=1)  # Σ_h ŵ_h (v · P_h)
                v = 0.5 * u / heads + 0.5 * v  # v · R_l with R_l = 0.5 Ā_l + 0.5 I, Ā_l = Σ_h ŵ_h P_h / H
        return v.float()

    # --- path selection -------------------------------------------------------------------------------------------

    def _choose_kernel(self, q: torch.Tensor) -> None:
        """Pick the Triton kernels or the PyTorch path for this batch (SPEC §5.8a); a forced "triton" fails loudly.

        "auto" takes Triton only for CUDA tensors; a forced "triton" also runs CPU tensors under Triton's
        interpreter (TRITON_INTERPRET=1), which is how the CPU tests check the kernels' logic.
        """
        if self._kernel == "torch":
            return
        supported = q.dtype in KERNEL_INPUT_DTYPES and self._dtype == torch.float32
        if self._kernel == "auto" and not (supported and q.is_cuda):
            return
        try:
            from model.attention import kernels as rollout_kernels
        except ImportError as exc:
            if self._kernel == "triton":
                raise DecafError(f"kernel='triton' needs the triton package ({exc}); use kernel='torch'") from exc
            return
        if not (supported and (q.is_cuda or _triton_interpreted())):
            raise DecafError(f"kernel='triton' needs CUDA tensors of dtype bf16, fp16 or fp32, got {q.dtype} q on "
                             f"{q.device}; use kernel='torch'")
        self._kernels = rollout_kernels

    def _masks_for_kernels(self, masks: _RowMasks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """int8 visual mask and int8 key mask (None without padding), contiguous, as the kernels read them."""
        if self._kernel_masks is None:
            real = masks.real.to(torch.int8).contiguous() if masks.padded else None
            self._kernel_masks = (masks.visual.to(torch.int8).contiguous(), real)
        return self._kernel_masks

    # --- chunked PyTorch path -------------------------------------------------------------------------------------

    def _chunk_rows(self, batch: int, heads: int, length: int) -> int:
        """Query rows per chunk so that one fp32 score chunk (B, H, C, L) stays within the byte budget."""
        return max(1, self._chunk_bytes // (batch * heads * length * 4))

    def _scores(self, q: torch.Tensor, k_up: torch.Tensor, masks: _RowMasks, scale: float, start: int,
                stop: int) -> torch.Tensor:
        """S[:, :, start:stop, :stop] (SPEC §5.2) in the rollout dtype, causal and pad keys set to −inf."""
        batch, heads, _, head_dim = q.shape
        kv_heads = k_up.shape[1]
        # GQA without repeating k: group the query heads of one key head (h = kv·G + g, SPEC §5.2)
        q_chunk = q[:, :, start:stop].to(self._dtype).reshape(batch, kv_heads, heads // kv_heads, stop - start,
                                                              head_dim)
        scores = (q_chunk @ k_up[:, :, None, :stop].transpose(-1, -2)).reshape(batch, heads, stop - start, stop)
        scores = scores * scale
        positions = torch.arange(stop, device=q.device)
        allowed = (positions[None, :] <= positions[start:stop, None])[None, None]
        if masks.padded:
            allowed = allowed & masks.real[:, None, None, :stop]
        return scores.masked_fill_(~allowed, float("-inf"))

    def _torch_stats(self, q: torch.Tensor, k: torch.Tensor, masks: _RowMasks,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """lse and m = exp(max_{j∈V} S − lse), both (B, H, L) fp32, by query chunks (SPEC §5.3, §5.8a)."""
        batch, heads, length, _ = q.shape
        lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
        m = torch.empty_like(lse)
        k_up = k.to(self._dtype)
        step = self._chunk_rows(batch, heads, length)
        for start in range(0, length, step):
            stop = min(length, start + step)
            scores = self._scores(q, k_up, masks, scale, start, stop)
            chunk_lse = torch.logsumexp(scores, dim=-1)
            chunk_lse = chunk_lse.masked_fill(chunk_lse == float("-inf"), float("inf"))  # no real key: P row = 0
            visual_max = scores.masked_fill_(~masks.visual[:, None, None, :stop], float("-inf")).amax(dim=-1)
            lse[:, :, start:stop] = chunk_lse
            m[:, :, start:stop] = torch.exp(visual_max - chunk_lse)
        return lse, m

    def _torch_step(self, layer: _CapturedLayer, v: torch.Tensor, masks: _RowMasks, scale: float) -> torch.Tensor:
        """Per-head v · P_h (B, H, L) of one layer, P recomputed chunk by chunk (SPEC §5.8a); fp64 running sum."""
        q, lse = layer.q, layer.lse
        batch, heads, length, _ = q.shape
        k_up = layer.k.to(self._dtype)
        v_low = v.to(self._dtype)
        out = torch.zeros((batch, heads, length), dtype=torch.float64, device=q.device)
        step = self._chunk_rows(batch, heads, length)
        for start in range(0, length, step):
            stop = min(length, start + step)
            if not v[:, start:stop].any():  # rows with v = 0 contribute nothing
                continue
            scores = self._scores(q, k_up, masks, scale, start, stop)
            probs = torch.exp(scores - lse[:, :, start:stop, None].to(self._dtype))
            weights = v_low[:, None, None, start:stop].expand(batch, heads, 1, stop - start)
            out[:, :, :stop] += (weights @ probs).squeeze(-2).double()
        return out


def _triton_interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1), which lets tests run the kernels on CPU."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
