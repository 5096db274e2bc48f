"""Scoring of one expression: dense masks (SPEC §11.4), coarse masks (§11.6) and keypoints (§9.3).

The scorers are top-level functions of picklable tasks so that they run in a spawn process pool (SPEC §11.9,
§14 #36). A task carries everything the scorer needs (the expression's own GT RLE lists, never the whole mask
dict). Any problem becomes a failure record naming the file; the expression then scores 0 (SPEC §11.4).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from evaluation.ground_truth import decode_rle, gt_masks
from model.utils.errors import DecafError
from model.utils.video import list_frames, read_frame_size
from .metrics import accuracy, boundary_f, region_similarity, robustness

PP_KS = (1, 5, 10, 50, 100)
KEYPOINTS_FILE = "keypoints.pt"


@dataclass(frozen=True)
class ExpressionTask:
    """One expression to score; built by :mod:`evaluation.evaluator` in job-list order."""

    video_key: str
    exp_id: str
    expression: str
    frames: tuple[str, ...]                 # meta["frames"] (SPEC §10.1)
    pred_dir: Path                          # <pred>/<video key>/<exp_id>
    anno_ids: tuple = ()
    gt: dict = field(default_factory=dict)  # {anno_id: [RLE or None per frame]} for this expression only
    type_id: int | None = None              # ReVOS only
    foreground: tuple | None = None         # ReVOS dense: the video's foreground RLE per frame (§10.3); None: no A/R
    frames_dir: Path | None = None          # keypoints: the video's frame folder (frame size and count, §9.3–§9.4)
    offset: int = 25                        # keypoints: window half-size o (§9.3)
    setup_error: str | None = None          # a problem found while building the task (e.g. GT key missing)


@dataclass
class ExpressionResult:
    """Raw (unrounded) values of one expression, or the reason it failed (then all values are 0)."""

    values: dict[str, float]    # empty on failure: the evaluator scores every key 0 (SPEC §11.4)
    problem: str | None = None  # failure reason; also set next to real values for stray PNGs (§11.6)
    excluded: bool = False      # keypoints: video's frame count differs from meta (§9.4)


def read_prediction(path: Path) -> np.ndarray:
    """A prediction PNG as 8-bit grayscale: values as stored for 8-bit grey PNGs (0/255 for DecAF outputs, SPEC
    §11.3); other modes (palette, RGB) are converted to luminance, as a grayscale read does."""
    if not path.is_file():
        raise DecafError(f"missing prediction {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "L":
                image = image.convert("L")
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DecafError(f"unreadable prediction {path}: {exc}") from exc


def _check_expression_folder(task: ExpressionTask) -> None:
    if task.setup_error:
        raise DecafError(task.setup_error)
    if not task.pred_dir.parent.is_dir():
        raise DecafError(f"missing video folder {task.pred_dir.parent}")
    if not task.pred_dir.is_dir():
        raise DecafError(f"missing expression folder {task.pred_dir}")
    if not task.frames:
        raise DecafError(f"meta lists no frames for video {task.video_key}")


def _check_shape(pred: np.ndarray, size: tuple[int, int], path: Path) -> None:
    if pred.shape != size:
        raise DecafError(f"prediction {path} is {pred.shape[1]}x{pred.shape[0]}, expected {size[1]}x{size[0]}")


def _gt_frame(task: ExpressionTask, index: int, size: tuple[int, int]) -> np.ndarray:
    return gt_masks(task.anno_ids, task.gt, len(task.frames), size=size, indices=[index])[0]


def _foreground_frame(task: ExpressionTask, index: int, size: tuple[int, int]) -> np.ndarray:
    rle = task.foreground[index]
    if rle is None:
        return np.zeros(size, dtype=np.uint8)
    mask = decode_rle(rle)
    if mask.shape != size:
        raise DecafError(f"foreground mask of frame {index} is {mask.shape[1]}x{mask.shape[0]}, "
                         f"expected {size[1]}x{size[0]}")
    return mask


def score_dense(task: ExpressionTask) -> ExpressionResult:
    """SPEC §11.4: J_e, F_e (and A_e, R_e with a foreground) as means over **every** meta frame.

    The size is that of the prediction PNG of ``frames[0]``; frames are scored one at a time so memory stays at
    one frame whatever the video length.
    """
    _check_expression_folder(task)
    if task.foreground is not None and len(task.foreground) < len(task.frames):
        raise DecafError(f"foreground mask of video {task.video_key} has {len(task.foreground)} entries for "
                         f"{len(task.frames)} meta frames")
    first = read_prediction(task.pred_dir / f"{task.frames[0]}.png")
    size = first.shape
    js, fs, accs, robs = [], [], [], []
    for index, name in enumerate(task.frames):
        path = task.pred_dir / f"{name}.png"
        pred = first if index == 0 else read_prediction(path)
        _check_shape(pred, size, path)
        gt = _gt_frame(task, index, size)
        js.append(region_similarity(gt, pred))
        fs.append(boundary_f(gt, pred))
        if task.foreground is not None:
            accs.append(accuracy(gt, pred))
            robs.append(robustness(gt, pred, _foreground_frame(task, index, size)))
    values = {"J": float(np.mean(js)), "F": float(np.mean(fs))}
    if task.foreground is not None:
        values.update(A=float(np.mean(accs)), R=float(np.mean(robs)))
    return ExpressionResult(values)


def score_coarse(task: ExpressionTask) -> ExpressionResult:
    """SPEC §11.6: J_e, F_e over only the meta frames that have a PNG (the T sampled frames for coarse masks).

    PNG names that are not meta frames are reported as the result's problem and ignored in scoring (§14 #41).
    """
    _check_expression_folder(task)
    pngs = sorted(p for p in task.pred_dir.iterdir() if p.name.endswith(".png") and p.is_file())
    if not pngs:
        raise DecafError(f"no PNG in {task.pred_dir}")
    names = {p.name[: -len(".png")] for p in pngs}
    size = read_prediction(pngs[0]).shape
    js, fs = [], []
    for index, name in enumerate(task.frames):
        if name not in names:
            continue
        path = task.pred_dir / f"{name}.png"
        pred = read_prediction(path)
        _check_shape(pred, size, path)
        gt = _gt_frame(task, index, size)
        js.append(region_similarity(gt, pred))
        fs.append(boundary_f(gt, pred))
    stray = sorted(names - set(task.frames))
    if not js:
        raise DecafError(f"no PNG in {task.pred_dir} is named after a meta frame (e.g. {stray[0]}.png)")
    problem = (f"{len(stray)} PNG(s) in {task.pred_dir} are not meta frames and were ignored "
               f"(e.g. {stray[0]}.png)") if stray else None
    return ExpressionResult({"J": float(np.mean(js)), "F": float(np.mean(fs))}, problem)


def load_keypoints(path: Path) -> np.ndarray:
    """A ``keypoints.pt`` (SPEC §9.2): float (K, 4) [frame_index, y_rel, x_rel, score], loaded weights-only.

    Relative coordinates must lie in [0, 1]: outside it the half-open window slices would wrap around.
    """
    import torch

    if not path.is_file():
        raise DecafError(f"missing keypoints {path}")
    try:
        points = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files; all mean "unreadable"
        raise DecafError(f"unreadable keypoints {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(points, torch.Tensor) or points.ndim != 2 or points.shape[1] != 4 \
            or not points.is_floating_point():
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise DecafError(f"keypoints {path} must be a float (K, 4) tensor, got {shape}")
    array = points.to(torch.float32).numpy()
    if not np.all((array[:, 1:3] >= 0) & (array[:, 1:3] <= 1)):
        raise DecafError(f"keypoints {path}: y_rel/x_rel must lie in [0, 1]")
    return array


def point_precision(points: np.ndarray, gt: dict[int, np.ndarray], size: tuple[int, int], offset: int
                    ) -> dict[str, float]:
    """PP@K of SPEC §9.3 for K ∈ {1, 5, 10, 50, 100}; ``gt`` maps frame index → GT union mask of that frame.

    Points are sorted by score (descending, stable); a point hits when the GT has a positive pixel in the
    half-open window rows [max(py−o, 0), min(py+o, h−1)), columns likewise (replicated quirk, §14 #22).
    """
    h, w = size
    order = np.argsort(-points[:, 3], kind="stable")
    hits = []
    for row in points[order[: max(PP_KS)]]:
        t = int(row[0])
        py = min(int(np.float32(row[1]) * np.float32(h)), h - 1)
        px = min(int(np.float32(row[2]) * np.float32(w)), w - 1)
        window = gt[t][max(py - offset, 0):min(py + offset, h - 1), max(px - offset, 0):min(px + offset, w - 1)]
        hits.append(bool(window.any()))
    return {f"PP@{k}": sum(hits[:k]) / k for k in PP_KS}


def score_keypoints(task: ExpressionTask) -> ExpressionResult:
    """SPEC §9.3–§9.4 for one expression; excluded when the video's frame files ≠ its meta frames."""
    if task.setup_error:
        raise DecafError(task.setup_error)
    frame_files = list_frames(task.frames_dir)
    if len(frame_files) != len(task.frames):
        return ExpressionResult({}, excluded=True)
    size = read_frame_size(frame_files[0])
    points = load_keypoints(task.pred_dir / KEYPOINTS_FILE)
    frame_ids = sorted({int(t) for t in points[np.argsort(-points[:, 3], kind="stable")[: max(PP_KS)], 0]})
    for t in frame_ids:
        if not 0 <= t < len(task.frames):
            raise DecafError(f"keypoints {task.pred_dir / KEYPOINTS_FILE}: frame index {t} is outside the "
                             f"{len(task.frames)} meta frames")
    masks = gt_masks(task.anno_ids, task.gt, len(task.frames), size=size, indices=frame_ids)
    return ExpressionResult(point_precision(points, dict(zip(frame_ids, masks)), size, task.offset))


def _run(scorer: Callable[[ExpressionTask], ExpressionResult], task: ExpressionTask) -> ExpressionResult:
    """Score one task; a failure keeps the expression (the evaluator fills zeros) with its reason (SPEC §11.4,
    §11.9)."""
    try:
        return scorer(task)
    except DecafError as exc:
        return ExpressionResult({}, str(exc))
    except Exception as exc:  # an unexpected error must not stop the other expressions; report where it arose
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return ExpressionResult({}, f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno}) "
                                    f"while scoring {task.pred_dir}")


def dense_worker(task: ExpressionTask) -> ExpressionResult:
    return _run(score_dense, task)


def coarse_worker(task: ExpressionTask) -> ExpressionResult:
    return _run(score_coarse, task)


def keypoints_worker(task: ExpressionTask) -> ExpressionResult:
    return _run(score_keypoints, task)
