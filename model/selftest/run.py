"""Install self-test: the Ref-DAVIS run script end to end with tiny random-weight models (``decaf-selftest``).

Usage: ``python -m model.selftest [--keep] [--workdir DIR] [--device cpu|cuda]`` from a repository checkout;
``python -m model.selftest --make_ckpts ckpts/tiny`` only writes the tiny checkpoints that ``demo.py --tiny`` uses.

What it does, in a temporary folder and without any download:

1. builds a tiny Qwen2.5-VL checkpoint (the stock transformers class, 28 LLM layers so that the script's start
   layer 14 is "auto") and a tiny SAM2 (Hiera-T at 256 px) into ``ckpts/``;
2. builds a one-video Ref-DAVIS17 benchmark in the reference layout (SPEC §10.1–§10.2) from
   ``assets/sample_clip``: a meta file with two expressions and a VISA-style ``mask_dict.pkl`` of pycocotools RLEs;
3. runs ``evaluation/scripts/run_qwen2.5-vl-7b_F16_davis.sh`` through bash with environment overrides (the tiny
   checkpoints, a two-entry GPU list so that every inference step runs as two shards, N = 4, tiny token budgets);
4. checks that every output is complete: the attention caches, a coarse PNG per sampled frame, a SAM2 PNG per
   frame, both metrics JSON files and the shard logs, and prints the scores.

The weights are random, so the masks and scores mean nothing: the self-test only shows that the install works.
Exit status 0 on success; on failure a one-line reason (exit 2) and the work folder is kept for inspection.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from model.selftest.tiny.preset import make_tiny_checkpoints
from model.utils.errors import DecafError, run_cli
from model.utils.paths import REPO, SAMPLE_CLIP

SCRIPT = Path("evaluation/scripts/run_qwen2.5-vl-7b_F16_davis.sh")
VIDEO = "sample_clip"
EXPRESSIONS = ("the bed", "the girl jumping on the bed")
NUM_FRAMES = 4  # N: T = 4 sampled frames of the clip's 8
#: the GPU list of each device: two shards either way (on CUDA both use GPU 0, so one GPU is enough)
GPU_LISTS = {"cpu": ("0", "1"), "cuda": ("0", "0")}
SHARDS = len(GPU_LISTS["cpu"])
#: stage-1 flags appended last by the script (USER_ATTN_ARGS), so they win: tiny budgets, exact fp32 on CPU
TINY_ATTN_ARGS = "--attn_max_token 16 --max_new_tokens 4 --precision fp32 --attn_implementation sdpa"
#: variables of the caller's shell that would change what the script does
CLEARED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "GPUS", "STAGES",
               "VERSION", "NUM_FRAMES", "DATA_ROOT", "DECAF_DATA_ROOT", "USER_ATTN_ARGS", "USER_MASK_ARGS",
               "USER_EVAL_ARGS", "SAM2_CKPT", "SAM2_CFG", "SAM2_OVERRIDES", "ATTN_ROOT", "OUTPUT_ROOT",
               "RESULTS_ROOT", "EVAL_WORKERS", "PYTHON", "DEVICE")
DISCLAIMER = "random weights: the masks and scores are meaningless; this only checks the install"


def script_value(script: Path, name: str) -> str:
    """A plain ``NAME=value`` assignment at the top of a run script (the defaults of ``NAME=${NAME:-value}``)."""
    for line in script.read_text().splitlines():
        match = re.match(rf"^{name}=(\$\{{{name}:-)?([^\s}}]+)", line)
        if match:
            return match.group(2)
    raise DecafError(f"{script} sets no {name}; is the checkout complete?")


# ------------------------------------------------------------------------------------------------ building
def build_checkpoints(ckpts: Path) -> tuple[Path, Path, str, list[str]]:
    """Tiny Qwen2.5-VL and SAM2 checkpoints; returns (MLLM folder, SAM2 file, SAM2 config, Hydra overrides)."""
    tiny = make_tiny_checkpoints(ckpts)
    return tiny.version, tiny.vision_pretrained, tiny.vision_pretrained_config, list(tiny.sam2_overrides)


def gt_masks(frame_size: tuple[int, int], count: int) -> list[list[np.ndarray | None]]:
    """Synthetic GT of the two expressions: the lower half of each frame, and a box that is absent in frame 3."""
    height, width = frame_size
    lower = np.zeros((height, width), np.uint8)
    lower[height // 2:] = 1
    box = np.zeros((height, width), np.uint8)
    box[height // 5: 4 * height // 5, width // 4: width // 2] = 1
    return [[lower] * count, [None if f == 3 else box for f in range(count)]]


def build_benchmark(root: Path, clip: Path) -> tuple[list[str], tuple[int, int]]:
    """A Ref-DAVIS17 layout (SPEC §10.1–§10.2) with one video; returns its frame names and frame size."""
    from pycocotools import mask as mask_utils

    from model.utils.video import check_frame_sizes, frame_name, list_frames

    video_dir = root / "davis17/valid/JPEGImages" / VIDEO
    video_dir.mkdir(parents=True)
    for path in clip.glob("*.jpg"):
        shutil.copyfile(path, video_dir / path.name)
    frames = list_frames(video_dir)
    frame_size = check_frame_sizes(frames)
    names = [frame_name(path) for path in frames]
    meta = {"videos": {VIDEO: {"frames": names, "expressions": {
        str(i): {"exp": text, "obj_id": "1"} for i, text in enumerate(EXPRESSIONS)}}}}
    meta_path = root / "davis17/meta_expressions/valid/meta_expressions.json"
    meta_path.parent.mkdir(parents=True)
    meta_path.write_text(json.dumps(meta, indent=1))
    # VISA's mask_dict.pkl: one entry per expression under a running anno_id (one video: ids 0, 1), RLE or None
    mask_dict = {anno_id: [None if mask is None else mask_utils.encode(np.asfortranarray(mask)) for mask in masks]
                 for anno_id, masks in enumerate(gt_masks(frame_size, len(frames)))}
    (root / "davis17/valid/mask_dict.pkl").write_bytes(pickle.dumps(mask_dict))
    return names, frame_size


# ------------------------------------------------------------------------------------------------- running
def run_script(work: Path, mllm: Path, sam2: Path, sam2_config: str, overrides: list[str], device: str,
               timeout: int) -> Path:
    """The run script through bash with the self-test's overrides; returns its log file."""
    bash = shutil.which("bash")
    if bash is None:
        raise DecafError("bash is not installed; the run scripts need bash >= 4.4")
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
    env.update(PYTHON=sys.executable, VERSION=str(mllm), DATA_ROOT=str(work / "data"), DEVICE=device,
               GPUS=" ".join(GPU_LISTS[device]), NUM_FRAMES=str(NUM_FRAMES), USER_ATTN_ARGS=TINY_ATTN_ARGS,
               SAM2_CKPT=str(sam2), SAM2_CFG=sam2_config, SAM2_OVERRIDES=" ".join(overrides),
               ATTN_ROOT=str(work / "attn_weights"), OUTPUT_ROOT=str(work / "outputs"),
               RESULTS_ROOT=str(work / "results"), EVAL_WORKERS="1")
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # two shard processes share the cores
    log_path = work / "selftest.log"
    with open(log_path, "w") as log_file:
        # a session of its own: on a timeout or Ctrl-C the script's background shard processes are stopped too
        process = subprocess.Popen([bash, str(REPO / SCRIPT)], cwd=work, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            stop_process_group(process)
            raise DecafError(f"the run script did not finish within {timeout} s; log: {log_path}") from exc
        except BaseException:
            stop_process_group(process)
            raise
    if returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise DecafError(f"the run script failed with exit code {returncode}; full log: {log_path}")
    return log_path


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate the process group led by ``process`` (the script and its shards); kill whatever outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # the group outlives its leader while a shard still runs
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# ------------------------------------------------------------------------------------------------ checking
def check_png_folder(folder: Path, names: Sequence[str], frame_size: tuple[int, int]) -> None:
    """One 8-bit single-channel 0/255 PNG of the frame size per expected name, nothing else."""
    from PIL import Image

    if not folder.is_dir():
        raise DecafError(f"missing output folder {folder}")
    found = sorted(path.stem for path in folder.glob("*.png"))
    if found != sorted(names):
        raise DecafError(f"{folder} holds PNGs {found}, expected {sorted(names)}")
    for name in names:
        with Image.open(folder / f"{name}.png") as image:
            values = np.unique(np.asarray(image))
            if image.mode != "L" or image.size != (frame_size[1], frame_size[0]) or not set(values) <= {0, 255}:
                raise DecafError(f"{folder / name}.png is not a {frame_size[1]}x{frame_size[0]} 0/255 mask")


def check_metrics(path: Path) -> dict:
    """The evaluator's summary JSON, after checking that no expression failed."""
    for file in (path.with_name(path.name + ".json"), path.with_name(path.name + ".failures.json")):
        if not file.is_file():
            raise DecafError(f"missing metrics file {file}")
    failures = json.loads(path.with_name(path.name + ".failures.json").read_text())
    if failures:
        raise DecafError(f"{len(failures)} expression(s) failed evaluation: {failures[0]}")
    return json.loads(path.with_name(path.name + ".json").read_text())


def check_outputs(work: Path, names: list[str], frame_size: tuple[int, int]) -> dict[str, dict]:
    """Every output the script must leave (SPEC §12.2–§12.4); returns the coarse and SAM summaries."""
    from model.cache import load_cache
    from model.utils.paths import cache_file_name, cache_folder, metrics_path, output_folder, run_folder
    from model.utils.video import sample_indices

    model_name = script_value(REPO / SCRIPT, "MODEL_NAME")
    run = run_folder(NUM_FRAMES, int(script_value(REPO / SCRIPT, "START_LAYER")), -1)
    keys = sample_indices(len(names), NUM_FRAMES)
    caches = cache_folder(model_name, run, "davis", root=work / "attn_weights")
    for exp_id in map(str, range(len(EXPRESSIONS))):
        cache = load_cache(caches / cache_file_name(VIDEO, exp_id))  # validates the file (§12.2)
        if cache.key_frame_indices != keys or cache.frame0_size != frame_size:
            raise DecafError(f"{cache.path} records frames {cache.key_frame_indices} of size {cache.frame0_size}, "
                             f"expected {keys} of size {frame_size}")
    summaries = {}
    for kind, expected in (("attn-mask", [names[k] for k in keys]), ("sam-mask", names)):
        folder = output_folder(model_name, run, NUM_FRAMES, kind, "davis", root=work / "outputs")
        for exp_id in map(str, range(len(EXPRESSIONS))):
            check_png_folder(folder / VIDEO / exp_id, expected, frame_size)
        summaries[kind] = check_metrics(metrics_path(folder))
    # the script logs each shard of a multi-shard step to its own file: two per inference step
    logs = sorted(path.name for path in (work / "outputs" / model_name / run / "logs").glob("*_shard*.log"))
    for step in ("attn-map", f"inf-uniform-F{NUM_FRAMES}-attn-mask", f"inf-uniform-F{NUM_FRAMES}-sam-mask"):
        shard_logs = [name for name in logs if f"_{step}_shard" in name]
        if len(shard_logs) != SHARDS:
            raise DecafError(f"step {step} ran {len(shard_logs)} shard(s), expected {SHARDS}")
    return summaries


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decaf-selftest", description="Check a DecAF install: run the Ref-DAVIS script end to end with tiny "
                                           "random-weight models on a synthetic one-video benchmark (no download).")
    parser.add_argument("--workdir", default=None,
                        help="folder to work in (default: a new temporary folder, removed after a success)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder after a success")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the two shards and of SAM2 (cuda checks a GPU install)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds the run script may take")
    parser.add_argument("--make_ckpts", metavar="DIR", default=None,
                        help="only write the tiny random-weight checkpoints into DIR (e.g. ckpts/tiny, which "
                             "`python demo.py --tiny` uses) and exit; no self-test runs")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """The self-test; returns 0 or raises :class:`DecafError` naming what is broken."""
    args = build_parser().parse_args(argv)
    if args.make_ckpts:
        tiny = make_tiny_checkpoints(args.make_ckpts)
        print(f"tiny checkpoints written to {tiny.folder} ({DISCLAIMER}); try: python demo.py --tiny "
              f"--tiny_ckpts {tiny.folder} --video_path assets/sample_clip --exp \"the bed\"")
        return 0
    for needed in (SCRIPT, SAMPLE_CLIP):
        if not (REPO / needed).exists():
            raise DecafError(f"{REPO / needed} not found: run the self-test from a DecAF repository checkout")
    started = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="decaf-selftest-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise DecafError(f"--workdir {work} is not empty; give a new or empty folder")
    print(f"DecAF self-test in {work}")
    try:
        print("building tiny checkpoints and a one-video Ref-DAVIS benchmark …", flush=True)
        mllm, sam2, sam2_config, overrides = build_checkpoints(work / "ckpts")
        names, frame_size = build_benchmark(work / "data", REPO / SAMPLE_CLIP)
        print(f"running {SCRIPT} ({SHARDS} shards on {args.device}, N = {NUM_FRAMES}) …", flush=True)
        log_path = run_script(work, mllm, sam2, sam2_config, overrides, args.device, args.timeout)
        summaries = check_outputs(work, names, frame_size)
    except DecafError as exc:
        raise DecafError(f"self-test failed: {exc} (work folder kept: {work})") from exc
    elapsed = time.perf_counter() - started
    print(f"self-test passed in {elapsed:.0f} s: {len(EXPRESSIONS)} expressions on {len(names)} frames, "
          f"{SHARDS} shards per inference step; caches, coarse masks, SAM2 masks and metrics are complete")
    print(f"  coarse masks  {scores_text(summaries['attn-mask'])}")
    print(f"  SAM2 masks    {scores_text(summaries['sam-mask'])}")
    print(f"  {DISCLAIMER}")
    if args.keep or args.workdir:
        print(f"outputs kept in {work} (log: {log_path})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def scores_text(summary: dict[str, dict[str, float | None]]) -> str:
    """The metrics file's groups on one line each, e.g. ``overall: J 61.23  F 65.04  JF 63.14``.

    Written here rather than imported from the evaluators, so that ``model/`` never imports ``evaluation/``.
    """
    return "\n".join(f"{group}: " + "  ".join(f"{key} {'n/a' if value is None else f'{value:.2f}'}"
                                              for key, value in values.items())
                     for group, values in summary.items())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``decaf-selftest`` and ``python -m model.selftest``: exits 0, or 2 with a one-line error."""
    run_cli(run, argv)

