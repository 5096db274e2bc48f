"""SAM2-stage benchmark with the SAM 2.0 Hiera-L architecture (random weights), GPU.

Runs the attention-guided prompting of SPEC §8 on one video for several expressions (fixed fused maps with a few
hot regions), comparing the uncached computation (frames encoded as the stock predictor does) with the per-video
feature cache of SPEC §8.10 (frames offloaded to CPU or kept on the GPU). Reports image-encoder calls and seconds
per expression, peak GPU memory, and whether cached and uncached masks are identical (T3).

    python benchmarks/bench_sam2.py --frames_dir .bench_frames/bedroom --num_frames 70 --expressions 5

Prints a table; never asserts a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.sam2_prompting import FeatureCache, load_sam2_predictor, sam2_extension_loaded, sam2_masks  # noqa: E402
from model.tiny.sam2 import build_tiny_sam2_checkpoint  # noqa: E402
from model.video import sample_indices  # noqa: E402

BEDROOM = REPO.parent / "shared" / "data" / "videos" / "bedroom"


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


def run(predictor, phis, frames, keys, features_factory) -> list[dict[str, Any]]:
    rows = []
    features = features_factory()
    for index, phi in enumerate(phis):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = sam2_masks(predictor, phi, frames, keys, features=features)
        torch.cuda.synchronize()
        rows.append({"expression": index, "seconds": time.perf_counter() - start,
                     "encoder_calls": result.encoder_calls, "candidates": result.num_candidates,
                     "tracklets": result.num_tracklets, "masks": result.masks})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames_dir", type=Path, default=BEDROOM)
    parser.add_argument("--num_frames", type=int, default=70)
    parser.add_argument("--expressions", type=int, default=5)
    parser.add_argument("--uncached_expressions", type=int, default=None,
                        help="expressions run without the cache (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    frames = sorted(args.frames_dir.glob("*.jpg"))[: args.num_frames]
    keys = sample_indices(len(frames), 16)
    phis = [fused_map(seed, len(keys)) for seed in range(args.expressions)]
    with tempfile.TemporaryDirectory() as tmp:
        config, overrides = build_tiny_sam2_checkpoint(Path(tmp) / "sam2_hiera_l_random.pt", image_size=1024,
                                                       config="sam2_hiera_l.yaml")
        predictor = load_sam2_predictor(config, Path(tmp) / "sam2_hiera_l_random.pt", device="cuda",
                                        hydra_overrides=overrides)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "sam2_C_extension": sam2_extension_loaded(), "frames": len(frames),
                               "key_frames": len(keys), "modes": {}}
    modes = {
        "uncached": (lambda: None, args.uncached_expressions or args.expressions),
        "cached, frames on CPU": (lambda: FeatureCache(predictor, frames, offload_to_cpu=True), args.expressions),
        "cached, frames on GPU": (lambda: FeatureCache(predictor, frames, offload_to_cpu=False), args.expressions),
    }
    masks: dict[str, list[np.ndarray]] = {}
    for mode, (factory, count) in modes.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        rows = run(predictor, phis[:count], frames, keys, factory)
        total = time.perf_counter() - start
        masks[mode] = [row.pop("masks") for row in rows]
        results["modes"][mode] = {"rows": rows, "total_seconds": total,
                                  "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        print(mode, json.dumps(results["modes"][mode]), flush=True)
    for mode in list(modes)[1:]:
        pairs = zip(masks["uncached"], masks[mode])
        results["modes"][mode]["identical_to_uncached"] = all(np.array_equal(a, b) for a, b in pairs)

    print(f"\nSAM2 Hiera-L (random weights) on {results['device']}, torch {results['torch']}, "
          f"_C extension {'loaded' if results['sam2_C_extension'] else 'not loaded'}; {len(frames)} frames, "
          f"{len(keys)} key frames")
    print("| mode | expressions | encoder calls per expression | seconds per expression | total s | peak GiB | "
          "masks = uncached |")
    print("|---|---|---|---|---|---|---|")
    for mode, entry in results["modes"].items():
        calls = ", ".join(str(row["encoder_calls"]) for row in entry["rows"])
        seconds = ", ".join(f"{row['seconds']:.1f}" for row in entry["rows"])
        same = entry.get("identical_to_uncached", "-")
        print(f"| {mode} | {len(entry['rows'])} | {calls} | {seconds} | {entry['total_seconds']:.1f} | "
              f"{entry['peak_extra_gib']:.2f} | {same} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
