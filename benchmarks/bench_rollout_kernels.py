"""Time the streamed rollout (SPEC §5.8a) on random q/k at LLM dimensions and check its kernels against each other.

For each sequence length the table shows, for all captured layers together: a plain bf16 causal SDPA forward of the
same q/k/v, a proxy of the plain bf16 LLM prefill (every decoder layer's projections, SDPA and MLP on random
weights; no vision tower), the fused Triton rollout (stats during capture + the backward walk), the chunked PyTorch
rollout, capture overheads relative to the prefill proxy, and the maximum error relative to the largest entry
(SPEC §0.5 T1: ≤ 1e-5) of Triton against the PyTorch path and against the literal oracle. It prints; it never
asserts a time. Needs a CUDA device.

    python benchmarks/bench_rollout_kernels.py --lengths 3300 13000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.attention.rollout import make_rollout
from model.utils.errors import DecafError, run_cli

#: candidate tile configs tried by --sweep (BLOCK_M = query rows, BLOCK_N = key columns)
STATS_SWEEP = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8,
               num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
               dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)]
STEP_SWEEP = [dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4,
              num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3), dict(BLOCK_M=32, BLOCK_N=128, num_warps=4,
              num_stages=3)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[3300, 13000], help="sequence lengths L to time")
    parser.add_argument("--layers", type=int, default=14, help="captured decoder layers (default 14 of 28)")
    parser.add_argument("--model_layers", type=int, default=28, help="decoder layers of the prefill proxy")
    parser.add_argument("--heads", type=int, default=28, help="query heads H (Qwen2.5-VL-7B: 28)")
    parser.add_argument("--kv_heads", type=int, default=4, help="key/value heads H_kv (Qwen2.5-VL-7B: 4)")
    parser.add_argument("--head_dim", type=int, default=128, help="head dimension d")
    parser.add_argument("--hidden", type=int, default=3584, help="hidden size of the prefill proxy")
    parser.add_argument("--intermediate", type=int, default=18944, help="MLP size of the prefill proxy")
    parser.add_argument("--visual_fraction", type=float, default=0.9,
                        help="fraction of the sequence that is visual tokens (one block after a short prefix)")
    parser.add_argument("--torch_max_len", type=int, default=13000,
                        help="time the chunked PyTorch path only up to this L (it is slow)")
    parser.add_argument("--oracle_max_len", type=int, default=4096,
                        help="compare against the literal oracle (L×L matrices) only up to this L")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported) after a warm-up")
    parser.add_argument("--sweep", action="store_true",
                        help="also time a few tile configs of each Triton kernel on one layer and print them")
    return parser.parse_args(argv)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time in ms of fn() (after one warm-up call, synchronised) and its last result."""
    result = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def rel_error(result: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |x − x̂| / max |x̂| (SPEC §0.5 T1 measure)."""
    return ((result.double() - oracle.double()).abs().max() / oracle.double().abs().max()).item()


def prefill_proxy(args: argparse.Namespace, length: int) -> Callable[[], torch.Tensor]:
    """A plain bf16 LLM prefill stand-in: per layer qkv/o projections, causal SDPA (GQA), gated MLP."""
    dev, dt = "cuda", torch.bfloat16
    hidden, q_dim, kv_dim = args.hidden, args.heads * args.head_dim, args.kv_heads * args.head_dim
    w_qkv = torch.randn(q_dim + 2 * kv_dim, hidden, device=dev, dtype=dt) * hidden ** -0.5
    b_qkv = torch.zeros(q_dim + 2 * kv_dim, device=dev, dtype=dt)
    w_o = torch.randn(hidden, q_dim, device=dev, dtype=dt) * q_dim ** -0.5
    w_up = torch.randn(2 * args.intermediate, hidden, device=dev, dtype=dt) * hidden ** -0.5
    w_down = torch.randn(hidden, args.intermediate, device=dev, dtype=dt) * args.intermediate ** -0.5
    x0 = torch.randn(1, length, hidden, device=dev, dtype=dt)

    def forward() -> torch.Tensor:
        x = x0
        for _ in range(args.model_layers):  # one weight set reused: same cost as distinct layers
            h = F.rms_norm(x, (hidden,))
            q, k, v = F.linear(h, w_qkv, b_qkv).split([q_dim, kv_dim, kv_dim], dim=-1)
            q = q.view(1, length, args.heads, args.head_dim).transpose(1, 2)
            k = k.view(1, length, args.kv_heads, args.head_dim).transpose(1, 2)
            v = v.view(1, length, args.kv_heads, args.head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + F.linear(attn.transpose(1, 2).reshape(1, length, q_dim), w_o)
            gate, up = F.linear(F.rms_norm(x, (hidden,)), w_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        return x

    return forward


def rollout_runner(impl: str, kernel: str, layers, visual: torch.Tensor,
                   walk: bool = True) -> Callable[[], torch.Tensor | None]:
    """A callable that captures every layer into a fresh rollout and, with walk, returns its rows."""
    def capture() -> torch.Tensor | None:
        rollout = make_rollout(impl, visual, kernel=kernel)
        for q, k in layers:
            rollout.add_layer(q, k)
        return rollout.rows() if walk else None

    return capture


def sweep(layers, visual: torch.Tensor, repeats: int) -> None:
    """Time each candidate tile config of both kernels on the first layer."""
    from model import rollout_kernels as kernels

    q, k = layers[0]
    vis8 = visual.to(torch.int8)
    scale = q.shape[-1] ** -0.5
    lse, _ = kernels.attention_stats(q, k, vis8, None, scale)
    v = torch.rand(visual.shape, device=q.device)
    for config in STATS_SWEEP:
        ms, _ = timed(lambda: kernels.attention_stats(q, k, vis8, None, scale, config), repeats)
        print(f"    stats {config}: {ms:.2f} ms/layer")
    for config in STEP_SWEEP:
        ms, _ = timed(lambda: kernels.rollout_step(q, k, lse, v, None, scale, config), repeats)
        print(f"    step  {config}: {ms:.2f} ms/layer (dense v)")


def peak_extra_gib(fn: Callable[[], object]) -> float:
    """GPU memory allocated by fn() at its peak beyond what was allocated before, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


HEADER = (f"{'L':>6} | {'sdpa ms':>7} | {'prefill ms':>10} | {'triton ms (stats+walk)':>22} | {'torch ms':>8} | "
          f"{'x triton':>8} | {'x torch':>7} | {'tri-vs-torch':>12} | {'tri-vs-oracle':>13} | {'torch-vs-oracle':>15} |"
          f" {'peak GiB tri/torch':>18}")


def measure(args: argparse.Namespace, length: int) -> str:
    """One table row for sequence length L (see the module docstring)."""
    gen = torch.Generator(device="cuda").manual_seed(length)
    layers = [(torch.randn(1, args.heads, length, args.head_dim, device="cuda", generator=gen,
                           dtype=torch.bfloat16) * 3,
               torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", generator=gen,
                           dtype=torch.bfloat16)) for _ in range(args.layers)]
    values = torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)
    visual = torch.zeros(1, length, dtype=torch.bool, device="cuda")
    prefix = max(1, int(length * (1 - args.visual_fraction) / 2))
    visual[:, prefix:prefix + int(length * args.visual_fraction)] = True

    sdpa_ms, _ = timed(lambda: [F.scaled_dot_product_attention(q, k, values, is_causal=True, enable_gqa=True)
                                for q, k in layers], args.repeats)
    prefill_ms, _ = timed(prefill_proxy(args, length), args.repeats)
    triton = rollout_runner("streamed", "triton", layers, visual)
    triton_ms, triton_rows = timed(triton, args.repeats)
    # the stats half alone (one rollout, every layer added, no walk): it runs inside the prefill, the walk after it
    stats_ms, _ = timed(rollout_runner("streamed", "triton", layers, visual, walk=False), args.repeats)
    peak_triton = peak_extra_gib(triton)

    nan = float("nan")
    torch_ms, peak_torch, err_torch, err_oracle, err_torch_oracle = nan, nan, nan, nan, nan
    if length <= args.torch_max_len:
        torch_path = rollout_runner("streamed", "torch", layers, visual)
        torch_ms, torch_rows = timed(torch_path, 1)
        peak_torch = peak_extra_gib(torch_path)
        err_torch = rel_error(triton_rows, torch_rows)
    if length <= args.oracle_max_len:
        oracle = rollout_runner("literal", "auto", layers, visual)()
        err_oracle = rel_error(triton_rows, oracle)
        if length <= args.torch_max_len:
            err_torch_oracle = rel_error(torch_rows, oracle)
    if args.sweep:
        sweep(layers, visual, args.repeats)
    return (f"{length:>6} | {sdpa_ms:>7.1f} | {prefill_ms:>10.1f} | {triton_ms:>7.1f} ({stats_ms:>5.1f}+"
            f"{triton_ms - stats_ms:>5.1f}) | {torch_ms:>8.1f} | {(prefill_ms + triton_ms) / prefill_ms:>8.3f} | "
            f"{(prefill_ms + torch_ms) / prefill_ms:>7.3f} | {err_torch:>12.2e} | {err_oracle:>13.2e} | "
            f"{err_torch_oracle:>15.2e} | {peak_triton:>8.3f}/{peak_torch:>6.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise DecafError("bench_rollout_kernels.py needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; H={args.heads}, H_kv={args.kv_heads}, "
          f"d={args.head_dim}, {args.layers} captured layers, prefill proxy {args.model_layers} layers")
    rows = []
    for length in args.lengths:
        rows.append(measure(args, length))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    print("\n" + HEADER + "\n" + "-" * len(HEADER) + "\n" + "\n".join(rows))
    print("x triton / x torch: (prefill proxy + rollout) / prefill proxy. tri/torch-vs-*: max|x - x^| / max|x^| "
          "(SPEC §0.5 T1 bound 1e-5). peak GiB: memory one rollout allocates beyond the stored q/k.")
    return 0


if __name__ == "__main__":
    run_cli(main)
