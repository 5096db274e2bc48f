"""The shared body of the three evaluators (SPEC §11, §9.3–§9.4, §13.3).

``eval_rvos.py`` (dense, §11.4), ``eval_rvos_obj_iou.py`` (coarse, §11.6) and ``eval_rvos_keypoints.py`` (PP@K,
§9.3) differ only in their scorer and result columns. This module parses their common flags, builds one picklable
task per expression in job-list order, scores the tasks in a spawn-safe process pool (§11.9, §14 #36), aggregates
(§11.5, §9.4) and writes ``<metrics path>.json`` / ``.csv`` / ``.failures.json`` (§11.8, §12.4).
"""
from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from evaluation.ground_truth import davis_anno_ids, expression_anno_ids, find_mask_key, load_mask_dict
from model.jobs.benchmarks import DATASETS, dataset_files, jobs_from_meta, load_meta
from model.utils.atomic import atomic_write, atomic_write_json, write_manifest
from model.utils.errors import EXIT_JOBS_FAILED, DecafError
from model.utils.paths import data_name, metrics_path
from .metrics import aggregate, aggregate_revos, expression_values, percent
from .scoring import (PP_KS, ExpressionResult, ExpressionTask, coarse_worker, dense_worker,
                      keypoints_worker)

log = logging.getLogger(__name__)

ROW_HEAD = ["video_name", "exp_id", "exp", "videxp"]


@dataclass(frozen=True)
class EvaluatorSpec:
    """What distinguishes one evaluator: its scorer and which extra flags and files it uses."""

    command: str
    worker: Callable[[ExpressionTask], ExpressionResult]
    uses_foreground: bool = False  # dense ReVOS: A and R need the foreground masks (§11.3)
    keypoints: bool = False


DENSE = EvaluatorSpec("eval_rvos", dense_worker, uses_foreground=True)
COARSE = EvaluatorSpec("eval_rvos_obj_iou", coarse_worker)
KEYPOINTS = EvaluatorSpec("eval_rvos_keypoints", keypoints_worker, keypoints=True)


def build_parser(spec: EvaluatorSpec, description: str) -> argparse.ArgumentParser:
    """The flags of SPEC §13.3 (``--offset`` for keypoints); scores follow the paper's VISA protocol (§11.11)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("pred_path", type=Path,
                        help="prediction folder holding <video key>/<exp_id>/ (e.g. outputs/.../davis_valid); "
                             "results go to the same path with 'outputs' replaced by 'metrics'")
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="benchmark; selects the GT files, the DAVIS anno-id mapping and ReVOS aggregation")
    parser.add_argument("--data_root", type=Path, default=None,
                        help="root of the benchmarks (default: $DECAF_DATA_ROOT or datasets/RVOSJoint)")
    parser.add_argument("--exp_path", type=Path, default=None,
                        help="meta-expressions JSON (default: the dataset's meta under --data_root)")
    parser.add_argument("--mask_path", type=Path, default=None,
                        help="GT mask dict, .json or .pkl (default: the dataset's mask dict under --data_root)")
    if spec.uses_foreground:
        parser.add_argument("--foreground_mask_path", type=Path, default=None,
                            help="ReVOS foreground masks for R (default: ReVOS/mask_dict_foreground.json); "
                                 "ignored for other datasets")
    else:
        parser.add_argument("--foreground_mask_path", type=Path, default=None,
                            help="accepted for compatibility; only the dense evaluator (eval_rvos.py) uses it")
    parser.add_argument("--testset", action="store_true",
                        help="MeViS 'valid' split; an error here, since it has no local GT (use the server zip)")
    parser.add_argument("--allow_missing", action="store_true",
                        help="exit 0 even if some expressions are missing or failed (they still score 0 and "
                             "are listed in <metrics path>.failures.json)")
    parser.add_argument("--num_workers", type=int, default=16,
                        help="scoring processes (spawn pool; default 16); 0 or 1 scores in this process")
    if spec.keypoints:
        parser.add_argument("--offset", type=int, default=25,
                            help="half-size o of the hit window in pixels (default 25; the reference scripts used 14)")
    return parser


def _check_arguments(spec: EvaluatorSpec, args: argparse.Namespace) -> None:
    if args.testset:
        raise DecafError("--testset selects MeViS 'valid', which has no local GT; submit it with "
                         "evaluation/zip_refvos_results.py instead")
    if args.dataset == "ytvos":
        raise DecafError("Ref-YouTube-VOS has no local GT; submit it with evaluation/zip_refvos_results.py")
    if args.num_workers < 0:
        raise DecafError(f"--num_workers must be >= 0, got {args.num_workers}")
    if spec.keypoints and args.offset < 1:
        raise DecafError(f"--offset must be a positive number of pixels, got {args.offset}")
    if not args.pred_path.is_dir():
        raise DecafError(f"prediction folder not found: {args.pred_path}")


def _videxp(video: str, exp_id: str) -> str:
    return f"{video}_{exp_id}"


def build_tasks(spec: EvaluatorSpec, args: argparse.Namespace) -> tuple[list[ExpressionTask], dict]:
    """One task per meta expression, in job-list order (SPEC §10.9); returns the tasks and the files used."""
    files = dataset_files(args.dataset, args.data_root)
    meta_path = args.exp_path or files.meta
    mask_path = args.mask_path or files.mask
    meta = load_meta(meta_path)
    mask_dict = load_mask_dict(mask_path)
    revos = args.dataset == "revos"
    foreground = None
    foreground_path = None
    if revos and spec.uses_foreground:
        foreground_path = args.foreground_mask_path or files.foreground
        foreground = load_mask_dict(foreground_path)
    davis_map = davis_anno_ids(meta) if args.dataset == "davis" else None

    tasks = []
    for job in jobs_from_meta(args.dataset, meta, files.frames_root, meta_path):
        entry = meta[job.video_key]
        exp = entry["expressions"][job.exp_id]
        anno_ids = expression_anno_ids(args.dataset, meta, job.video_key, job.exp_id, davis_map)
        gt, problems = {}, []
        for anno_id in anno_ids:
            key = find_mask_key(mask_dict, anno_id)
            if key is None:
                problems.append(f"anno_id {anno_id!r} of {job.job_id} is missing from {mask_path}")
            else:
                gt[anno_id] = mask_dict[key]
        type_id = None
        if revos:
            if "type_id" not in exp:
                raise DecafError(f"meta file {meta_path}: ReVOS expression {job.job_id} has no 'type_id'")
            type_id = int(exp["type_id"])
        video_foreground = None
        if foreground is not None:
            fg_entry = foreground.get(job.video_key)
            if not isinstance(fg_entry, dict) or not isinstance(fg_entry.get("masks_rle"), list):
                problems.append(f"{foreground_path} has no 'masks_rle' for video {job.video_key}")
                video_foreground = ()  # not None: the expression still has A and R columns (scored 0)
            else:
                video_foreground = tuple(fg_entry["masks_rle"])
        tasks.append(ExpressionTask(
            video_key=job.video_key, exp_id=job.exp_id, expression=job.expression,
            frames=tuple(entry["frames"]), pred_dir=args.pred_path / job.video_key / job.exp_id,
            anno_ids=tuple(anno_ids), gt=gt, type_id=type_id, foreground=video_foreground,
            frames_dir=job.frames_dir, offset=getattr(args, "offset", 25),
            setup_error="; ".join(problems) or None))
    used = {"meta": str(meta_path), "mask": str(mask_path),
            "foreground": None if foreground_path is None else str(foreground_path)}
    return tasks, used


def run_pool(worker: Callable[[ExpressionTask], ExpressionResult], tasks: Sequence[ExpressionTask],
             num_workers: int, desc: str) -> list[ExpressionResult]:
    """Results in task order; a spawn-context process pool when ``num_workers`` > 1 (SPEC §11.9)."""
    if num_workers <= 1 or len(tasks) <= 1:
        return [worker(task) for task in tqdm(tasks, desc=desc, unit="exp")]
    workers = min(num_workers, len(tasks))
    # small chunks keep the bar moving while amortising the pickling of tasks
    chunksize = max(1, min(8, len(tasks) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(worker, tasks, chunksize=chunksize), total=len(tasks), desc=desc, unit="exp"))


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _mask_rows(spec: EvaluatorSpec, revos: bool, tasks: Sequence[ExpressionTask],
               results: Sequence[ExpressionResult]) -> tuple[list[str], list[dict[str, Any]], dict]:
    """CSV rows and the summary JSON for the dense and coarse evaluators (SPEC §11.5, §11.8)."""
    with_ar = revos and spec.uses_foreground
    keys = ("J", "F", "A", "R") if with_ar else ("J", "F")
    columns = ROW_HEAD + ["J", "F", "JF"] + (["A", "R"] if with_ar else []) + (["type_id"] if revos else [])
    rows = []
    for task, result in zip(tasks, results):
        raw = {key: result.values.get(key, 0.0) for key in keys}  # failures score 0 (SPEC §11.4)
        values = expression_values(raw["J"], raw["F"], raw.get("A"), raw.get("R"))
        row = {"video_name": task.video_key, "exp_id": task.exp_id, "exp": task.expression,
               "videxp": _videxp(task.video_key, task.exp_id), **values}
        if revos:
            row["type_id"] = task.type_id
        rows.append(row)
    summary = aggregate_revos(rows, keys) if revos else {"overall": aggregate(rows, keys)}
    return columns, rows, summary


def _keypoint_rows(tasks: Sequence[ExpressionTask], results: Sequence[ExpressionResult]
                   ) -> tuple[list[str], list[dict[str, Any]], dict]:
    """CSV rows and summary of SPEC §9.4; excluded expressions get empty cells and stay out of the means."""
    keys = [f"PP@{k}" for k in PP_KS]
    rows, included = [], []
    for task, result in zip(tasks, results):
        row = {"video_name": task.video_key, "exp_id": task.exp_id, "exp": task.expression,
               "videxp": _videxp(task.video_key, task.exp_id)}
        if result.excluded:
            row.update({key: "" for key in keys})
        else:
            row.update({key: percent(result.values.get(key, 0.0)) for key in keys})
            included.append(row)
        rows.append(row)
    return ROW_HEAD + keys, rows, {"overall": aggregate(included, keys)}


def _output_base(spec: EvaluatorSpec, args: argparse.Namespace) -> Path:
    base = metrics_path(args.pred_path)
    if spec.keypoints:
        base = base.with_name(f"{base.name}_offset-{args.offset}")
    return base


def evaluate(spec: EvaluatorSpec, argv: Sequence[str] | None, description: str) -> int:
    """Parse the flags, score every expression and write the results; the exit status of SPEC §11.9."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(spec, description).parse_args(argv)
    _check_arguments(spec, args)
    tasks, used_files = build_tasks(spec, args)
    if not tasks:
        raise DecafError(f"meta file {used_files['meta']} lists no expressions")
    results = run_pool(spec.worker, tasks, args.num_workers, desc=f"{spec.command} {data_name(args.dataset)}")

    revos = args.dataset == "revos"
    if spec.keypoints:
        columns, rows, summary = _keypoint_rows(tasks, results)
        excluded = sum(result.excluded for result in results)
        if excluded:
            log.warning("%d expression(s) excluded: their video's frame files differ from the meta frames "
                        "(SPEC §9.4)", excluded)
    else:
        columns, rows, summary = _mask_rows(spec, revos, tasks, results)

    failures = [{"video_name": task.video_key, "exp_id": task.exp_id, "reason": result.problem}
                for task, result in zip(tasks, results) if result.problem]
    for failure in failures:
        print(f"failed: {failure['video_name']}/{failure['exp_id']}: {failure['reason']}", file=sys.stderr)

    base = _output_base(spec, args)
    json_path = atomic_write_json(Path(f"{base}.json"), summary)
    csv_path = Path(f"{base}.csv")
    _write_csv(csv_path, columns, rows)
    failures_path = atomic_write_json(Path(f"{base}.failures.json"), failures)
    write_manifest(base.parent, spec.command, vars(args), files=used_files, results=str(json_path),
                   expressions=len(tasks), failed=len(failures))

    print(summary_text(summary))
    print(f"wrote {json_path} and {csv_path}")
    if failures:
        print(f"{len(failures)} of {len(tasks)} expression(s) missing or failed (scored 0); listed in "
              f"{failures_path}", file=sys.stderr)
        if not args.allow_missing:
            return EXIT_JOBS_FAILED
    return 0


def summary_text(summary: dict[str, dict[str, float | None]]) -> str:
    """One line per group, e.g. ``overall: J 61.23  F 65.04  JF 63.14``."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return "\n".join(f"{group}: " + "  ".join(f"{key} {fmt(value)}" for key, value in values.items())
                     for group, values in summary.items())
