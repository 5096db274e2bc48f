"""Per-frame metrics and their aggregation, VISA style (SPEC §11.1–§11.5).

J and F are the DAVIS-2017 definitions (region similarity and boundary F-measure). A and R are VISA's ReVOS
metrics, reproduced bit-exactly including the uint8 wrap-around of R (SPEC §11.3, §14 #19). Per-expression values
are rounded to 0.01 % before averaging, and ReVOS "overall" is the mean of its two type means (SPEC §11.5, §14 #20).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np

BOUND_TH = 0.008
REVOS_SUBSETS = (("referring", 0), ("reason", 1))  # type_id 2 is excluded from everything (SPEC §11.5)


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    """J of one frame, SPEC §11.1: |P ∧ G| / |P ∨ G| on boolean masks, 1 when the union is empty."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    union = int(np.count_nonzero(gt | pred))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(gt & pred)) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a boolean mask, the DAVIS ``seg2bmap`` at the mask's own size (SPEC §11.2)."""
    seg = mask.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """ceil(bound_th · image diagonal) for a relative threshold (< 1), else the threshold itself (SPEC §11.2)."""
    if bound_th >= 1:
        return int(bound_th)
    # sqrt of the exact integer sum, as np.linalg.norm(shape) in the DAVIS code (hypot may differ by an ulp)
    return int(math.ceil(bound_th * math.sqrt(height * height + width * width)))


@lru_cache(maxsize=8)
def _disk(radius: int) -> np.ndarray:
    from skimage.morphology import disk

    return disk(radius).astype(np.uint8)


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of one frame, SPEC §11.2: boundary precision/recall within a dilation radius, DAVIS edge cases."""
    gt_b = boundary_map(gt)
    pred_b = boundary_map(pred)
    kernel = _disk(boundary_radius(*gt.shape[:2], bound_th))
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), kernel)
    pred_dil = cv2.dilate(pred_b.astype(np.uint8), kernel)
    n_pred = int(np.count_nonzero(pred_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = int(np.count_nonzero(pred_b & (gt_dil > 0))) / float(n_pred)
        recall = int(np.count_nonzero(gt_b & (pred_dil > 0))) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def accuracy(gt: np.ndarray, pred: np.ndarray) -> float:
    """A of one frame, SPEC §11.3: mean(G == P) on the raw uint8 values (G 0/1/2, P 0/255), so in practice
    only true negatives count (replicated VISA quirk)."""
    return float(np.mean(gt == pred))


def robustness(gt: np.ndarray, pred: np.ndarray, foreground: np.ndarray) -> float:
    """R of one frame, SPEC §11.3, bit-exact VISA: neg = Σ((1 − G) · P) evaluated in uint8 (wrapping), summed
    with NumPy's default accumulator; R = max(0, 1 − neg / (ΣFG + 1e-6))."""
    gt = np.asarray(gt, dtype=np.uint8)
    pred = np.asarray(pred, dtype=np.uint8)
    neg = ((1 - gt) * pred).sum()
    return float(max(0, 1 - neg / (np.asarray(foreground, dtype=np.uint8).sum() + 1e-6)))


def percent(value: float) -> float:
    """A per-expression value as stored: round(100·x, 2) (SPEC §11.5)."""
    return round(100 * value, 2)


def expression_values(j: float, f: float, a: float | None = None, r: float | None = None) -> dict[str, float]:
    """The stored per-expression values J, F, JF (and A, R) of SPEC §11.5, rounded before any averaging."""
    values = {"J": percent(j), "F": percent(f), "JF": round(100 * (j + f) / 2, 2)}
    if a is not None:
        values["A"] = percent(a)
    if r is not None:
        values["R"] = percent(r)
    return values


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def aggregate(rows: Iterable[Mapping[str, float]], keys: Sequence[str] = ("J", "F")) -> dict[str, float | None]:
    """Means of the rounded per-expression ``keys`` (None when there are no rows); with J and F among them,
    JF = (J + F) / 2 of the means (SPEC §11.5)."""
    rows = list(rows)
    out = {key: _mean([row[key] for row in rows]) for key in keys}
    if "J" in out and "F" in out:
        out["JF"] = None if out["J"] is None else (out["J"] + out["F"]) / 2
    return out


def aggregate_revos(rows: Iterable[Mapping[str, float]], keys: Sequence[str] = ("J", "F", "A", "R")
                    ) -> dict[str, dict[str, float | None]]:
    """ReVOS aggregation (SPEC §11.5): type 0 "referring" and type 1 "reason" averaged separately, type 2
    excluded, and "overall" = (referring + reason) / 2 for every metric, JF included."""
    rows = list(rows)
    result = {name: aggregate([row for row in rows if int(row["type_id"]) == type_id], keys)
              for name, type_id in REVOS_SUBSETS}
    referring, reason = result["referring"], result["reason"]
    result["overall"] = {key: None if referring[key] is None or reason[key] is None
                         else (referring[key] + reason[key]) / 2 for key in referring}
    return result
