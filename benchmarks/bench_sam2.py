"""SAM2-stage benchmark: uncached, per-object cached and batched cached prompting on the same inputs (SPEC §8).

Runs the attention-guided prompting of SPEC §8 on one video for several expressions (fixed fused maps with a few
hot regions) in these modes:

* ``uncached``: frames encoded as the stock predictor does (one-frame cache), one object at a time;
* ``per-object``: the per-video feature cache of SPEC §8.10 (frames on CPU), one object at a time (the default,
  ``--sam2_batch 1``);
* ``batched N``: the same cache, N objects per SAM2 batch (``--sam2_batch N``).

For each mode: seconds per expression and per video (all expressions), median and min–max over ``--repeats``,
peak GPU memory, image-encoder calls, tracking steps (one per frame per batch of objects), the share of time in
the image encoder, the prompt encoder + mask decoder, memory attention, the memory encoder and frame I/O (from
one extra run with synchronising timers), and the pixels whose masks differ from the per-object and uncached
modes. Ratios are given against the per-object cached path and against the uncached path separately.

GPU, SAM 2.0 Hiera-L with random weights (time does not depend on the weight values)::

    python benchmarks/bench_sam2.py --frames_dir .bench_frames/bedroom --num_frames 70 --expressions 5 \\
        --batch 16 64 --repeats 3 --modes per-object batched --out sam2_batched.json
    python benchmarks/bench_sam2.py --frames_dir .bench_frames/bedroom --num_frames 70 --expressions 5 \
        --modes per-object uncached --repeats 1 --out sam2_uncached.json

CPU smoke check with a tiny Hiera-T at 256 px: ``python benchmarks/bench_sam2.py --tiny``. Never asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import model.sam.predictor as sam2_predictor  # noqa: E402
from model.sam.prompting import FeatureCache, load_sam2_predictor, sam2_extension_loaded, sam2_masks
from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint
from model.utils.atomic import atomic_write_json
from model.utils.video import sample_indices

#: the repository's 40 test frames; docs/benchmarks.md's numbers used the first frames of the full clip (--frames_dir)
BEDROOM = REPO / "tests" / "data" / "bedroom"
#: module name prefix → time category (exclusive time: a category nested in another is not counted twice)
MODULE_CATEGORIES = {"image_encoder": "image encoder", "sam_prompt_encoder": "prompt encoder + mask decoder",
                     "sam_mask_decoder": "prompt encoder + mask decoder", "memory_attention": "memory attention",
                     "memory_encoder": "memory encoder"}
IO = "frame I/O and feature copies"
OTHER = "other (Python, upsampling, NMS, AC)"


def fused_map(seed: int, frames: int, height: int = 28, width: int = 52) -> torch.Tensor:
    """A fixed Φ in [0, 1] with two Gaussian hot spots drifting over time (a handful of cells ≥ 0.8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    phi = rng.uniform(0.0, 0.4, size=(frames, height, width))
    centres = rng.uniform([4, 4], [height - 4, width - 4], size=(2, 2))
    for t in range(frames):
        for cy, cx in centres:
            cy, cx = cy + 0.2 * t, cx + 0.3 * t
            phi[t] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    phi = (phi - phi.min()) / (phi.max() - phi.min())
    return torch.from_numpy(phi.astype(np.float32))


class Timers:
    """Exclusive wall time per category, from forward hooks and wrapped functions that synchronise the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time spent in nested timed regions]
        self.enabled = False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def enter(self) -> None:
        if self.enabled:
            self._sync()
            self._stack.append([time.perf_counter(), 0.0])

    def leave(self, category: str) -> None:
        if self.enabled:
            self._sync()
            start, nested = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[category] += elapsed - nested
            if self._stack:
                self._stack[-1][1] += elapsed

    @contextlib.contextmanager
    def region(self, category: str) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave(category)

    def wrap(self, function: Callable, category: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.region(category):
                return function(*args, **kwargs)
        return timed

    def attach(self, predictor: torch.nn.Module) -> None:
        for name, category in MODULE_CATEGORIES.items():
            module = getattr(predictor, name)
            module.register_forward_pre_hook(lambda *_: self.enter())
            module.register_forward_hook(lambda *_, category=category: self.leave(category))
        # frame decoding (both session kinds) and the cache's copies of features to the device
        sam2_predictor.load_frame = self.wrap(sam2_predictor.load_frame, IO)
        FeatureCache.backbone_out = self.wrap(FeatureCache.backbone_out, IO)


def run_video(predictor, phis, frames, keys, batch_size: int, cached: bool, device: torch.device):
    """All expressions of the video in one mode; returns per-expression rows and their masks."""
    predictor.reset_video()  # every repeat starts without features, as a new video does
    rows, masks = [], []
    for phi in phis:
        steps_before = predictor.tracking_steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = sam2_masks(predictor, phi, frames, keys, cached_features=cached, batch_size=batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows.append({"seconds": time.perf_counter() - start, "encoder_calls": result.encoder_calls,
                     "tracking_steps": predictor.tracking_steps - steps_before,
                     "candidates": result.num_candidates, "tracklets": result.num_tracklets,
                     "selected": len(result.selected)})
        masks.append(result.masks)
    return rows, masks


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames_dir", type=Path, default=BEDROOM)
    parser.add_argument("--num_frames", type=int, default=None, help="frames of the video (default 70; 8 with --tiny)")
    parser.add_argument("--key_frames", type=int, default=None, help="sampled frames T (default 16; 4 with --tiny)")
    parser.add_argument("--expressions", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes N of the batched modes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (after one warm-up)")
    parser.add_argument("--modes", nargs="+", choices=("per-object", "batched", "uncached"),
                        default=["per-object", "batched", "uncached"],
                        help="modes to run, in this order; per-object is always run (the reference of the ratios)")
    parser.add_argument("--uncached_repeats", type=int, default=1, help="timed runs of the slow uncached mode")
    parser.add_argument("--no_profile", action="store_true", help="skip the extra run that measures time shares")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke check: tiny random Hiera-T at 256 px instead of Hiera-L at 1024 px")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    num_frames = args.num_frames or (8 if args.tiny else 70)
    frames = sorted(args.frames_dir.glob("*.jpg"))[:num_frames]
    keys = sample_indices(len(frames), args.key_frames or (4 if args.tiny else 16))
    phis = [fused_map(seed, len(keys)) for seed in range(args.expressions)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "sam2_random.pt"
        config, overrides = build_tiny_sam2_checkpoint(
            checkpoint, image_size=256 if args.tiny else 1024, config="sam2_hiera_t.yaml" if args.tiny
            else "sam2_hiera_l.yaml")
        predictor = load_sam2_predictor(config, checkpoint, device=device, hydra_overrides=overrides)
    timers = Timers(device)
    timers.attach(predictor)

    modes: dict[str, tuple[int, bool]] = {"per-object": (1, True)}
    if "batched" in args.modes:
        modes.update({f"batched {size}": (size, True) for size in args.batch})
    if "uncached" in args.modes:
        modes["uncached"] = (1, False)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "model": f"{config} ({predictor.image_size} px, random weights)", "sam2_C_extension": sam2_extension_loaded(),
        "frames": len(frames), "key_frames": len(keys), "expressions": len(phis), "modes": {}}
    masks: dict[str, list[np.ndarray]] = {}
    for mode, (size, cached) in modes.items():
        if cached:
            run_video(predictor, phis[:1], frames, keys, size, cached, device)  # warm-up
        timings = []
        for _ in range(args.repeats if cached else args.uncached_repeats):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            rows, masks[mode] = run_video(predictor, phis, frames, keys, size, cached, device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
            timings.append((rows, peak))
        shares = {}
        if not args.no_profile:
            timers.seconds.clear()
            timers.enabled = True
            start = time.perf_counter()
            run_video(predictor, phis, frames, keys, size, cached, device)
            profiled = time.perf_counter() - start
            timers.enabled = False
            shares = {category: seconds / profiled for category, seconds in sorted(timers.seconds.items())}
            shares[OTHER] = 1 - sum(shares.values())
        rows = timings[0][0]
        results["modes"][mode] = {
            "batch_size": size, "cached": cached,
            "per_expression_s": [summary([run[0][e]["seconds"] for run in timings]) for e in range(len(phis))],
            "per_video_s": summary([sum(row["seconds"] for row in run[0]) for run in timings]),
            "peak_extra_gib": max(run[1] for run in timings) if device.type == "cuda" else None,
            "encoder_calls": [row["encoder_calls"] for row in rows],
            "tracking_steps": [row["tracking_steps"] for row in rows],
            "candidates": [row["candidates"] for row in rows], "tracklets": [row["tracklets"] for row in rows],
            "selected": [row["selected"] for row in rows], "time_shares": shares}
        print(mode, json.dumps(results["modes"][mode]), flush=True)
    for mode, entry in results["modes"].items():
        for reference in ("per-object", "uncached"):
            if reference in masks and reference != mode:
                entry[f"pixels_differing_from_{reference}"] = [
                    int((a != b).sum()) for a, b in zip(masks[mode], masks[reference])]

    print(f"\nSAM2 {results['model']} on {results['device']}, torch {results['torch']}, _C extension "
          f"{'loaded' if results['sam2_C_extension'] else 'not loaded'}; {len(frames)} frames, {len(keys)} key "
          f"frames, {len(phis)} expressions, {args.repeats} repeats (median, min–max)")
    reference = results["modes"]["per-object"]["per_video_s"]["median"]
    uncached = results["modes"].get("uncached", {}).get("per_video_s", {}).get("median")
    print("| mode | s per expression | s per video | × per-object | × uncached | peak GiB | encoder calls | "
          "tracking steps | pixels ≠ per-object | pixels ≠ uncached |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, entry in results["modes"].items():
        video = entry["per_video_s"]
        per_expression = ", ".join(f"{row['median']:.2f}" for row in entry["per_expression_s"])
        peak = "–" if entry["peak_extra_gib"] is None else f"{entry['peak_extra_gib']:.2f}"
        ratio_uncached = f"{uncached / video['median']:.2f}×" if uncached else "–"
        print(f"| {mode} | {per_expression} | {video['median']:.2f} ({video['min']:.2f}–{video['max']:.2f}) | "
              f"{reference / video['median']:.2f}× | {ratio_uncached} | {peak} | "
              f"{sum(entry['encoder_calls'])} | {sum(entry['tracking_steps'])} | "
              f"{sum(entry.get('pixels_differing_from_per-object', [0]))} | "
              f"{sum(entry.get('pixels_differing_from_uncached', [0])) if uncached else '–'} |")
    categories = sorted({category for entry in results["modes"].values() for category in entry["time_shares"]},
                        key=lambda category: (category == OTHER, category))
    if categories:
        print("\nShare of time (one extra run with synchronising timers):\n")
        print("| mode | " + " | ".join(categories) + " |")
        print("|---|" + "---|" * len(categories))
        for mode, entry in results["modes"].items():
            print(f"| {mode} | " + " | ".join(f"{entry['time_shares'].get(category, 0.0):.0%}"
                                              for category in categories) + " |")
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
