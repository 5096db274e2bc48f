"""Metric functions of SPEC §11.1–§11.3 and the aggregation of §11.5, against hand-computed values and
brute-force oracles written from the SPEC's definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import (accuracy, aggregate, aggregate_revos, boundary_f, boundary_map, boundary_radius,
                                expression_values, region_similarity, robustness)


# ---- oracles (literal definitions, pixel loops / brute-force distances) ----------------------------------------
def boundary_oracle(mask: np.ndarray) -> np.ndarray:
    """SPEC §11.2 boundary, pixel by pixel: neighbours right/down/down-right (0 outside the image); the last row
    compares with the right neighbour only, the last column with the lower one only, the corner is 0."""
    m = mask.astype(bool)
    h, w = m.shape
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            right = m[i, j + 1] if j + 1 < w else False
            down = m[i + 1, j] if i + 1 < h else False
            diag = m[i + 1, j + 1] if i + 1 < h and j + 1 < w else False
            if i == h - 1 and j == w - 1:
                out[i, j] = False
            elif i == h - 1:
                out[i, j] = m[i, j] != right
            elif j == w - 1:
                out[i, j] = m[i, j] != down
            else:
                out[i, j] = (m[i, j] != right) or (m[i, j] != down) or (m[i, j] != diag)
    return out


def near(points_a: np.ndarray, points_b: np.ndarray, radius: int) -> np.ndarray:
    """For each pixel of a, whether some pixel of b lies within Euclidean distance ``radius`` (a disk dilation)."""
    if len(points_b) == 0:
        return np.zeros(len(points_a), dtype=bool)
    d2 = ((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(-1)
    return (d2 <= radius * radius).any(axis=1)


def f_oracle(gt: np.ndarray, pred: np.ndarray, boundary=boundary_oracle) -> float:
    """F with brute-force disk matching; ``boundary`` may be the (separately verified) fast map on big images."""
    h, w = gt.shape
    radius = math.ceil(0.008 * math.sqrt(h * h + w * w))
    bg, bp = np.argwhere(boundary(gt)), np.argwhere(boundary(pred))
    if len(bp) == 0 and len(bg) == 0:
        return 1.0
    if len(bp) == 0 or len(bg) == 0:
        return 0.0
    precision = near(bp, bg, radius).mean()
    recall = near(bg, bp, radius).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def blob(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


# ---- J (§11.1) -------------------------------------------------------------------------------------------------
def test_j_hand_computed():
    gt = np.zeros((4, 5), np.uint8)
    gt[1:3, 1:4] = 1                      # 6 pixels
    pred = np.zeros((4, 5), np.uint8)
    pred[1:3, 2:5] = 255                  # 6 pixels, 4 shared → union 8
    assert region_similarity(gt, pred) == 4 / 8


@pytest.mark.parametrize("gt_on, pred_on, expected", [(False, False, 1.0), (False, True, 0.0), (True, False, 0.0)])
def test_j_empty_cases(gt_on, pred_on, expected):
    gt = np.zeros((6, 7), np.uint8)
    pred = np.zeros((6, 7), np.uint8)
    gt[2, 3] = gt_on
    pred[4, 4] = 255 * pred_on
    assert region_similarity(gt, pred) == expected


def test_j_treats_any_nonzero_as_foreground():
    gt = np.array([[0, 1, 2]], np.uint8)   # 2 = overlapping objects
    pred = np.array([[0, 255, 7]], np.uint8)
    assert region_similarity(gt, pred) == 1.0


# ---- boundary and F (§11.2) ------------------------------------------------------------------------------------
def test_boundary_map_hand_computed():
    mask = np.zeros((5, 5), np.uint8)
    mask[1:3, 1:3] = 1
    expected = np.zeros((5, 5), bool)
    expected[0, 0:3] = expected[1, [0, 2]] = expected[2, 0:3] = True
    np.testing.assert_array_equal(boundary_map(mask), expected)


def test_boundary_map_masks_touching_the_border():
    rng = np.random.default_rng(0)
    full = np.ones((6, 9), np.uint8)
    assert not boundary_map(full).any()   # a full-image mask has no boundary (DAVIS definition)
    right = np.zeros((6, 9), np.uint8)
    right[:, 5:] = 1                      # touches top, bottom and right borders
    np.testing.assert_array_equal(boundary_map(right), boundary_oracle(right))
    assert boundary_map(right)[:, 4].all() and boundary_map(right).sum() == 6
    for _ in range(20):
        m = (rng.random((7, 11)) < 0.5).astype(np.uint8)
        np.testing.assert_array_equal(boundary_map(m), boundary_oracle(m))


def test_boundary_radius():
    assert boundary_radius(480, 854) == 8
    assert boundary_radius(720, 1280) == 12
    assert boundary_radius(48, 64) == 1
    assert boundary_radius(48, 64, bound_th=3) == 3


def test_f_hand_computed_precision_half():
    gt = np.zeros((48, 64), np.uint8)
    gt[10, 10] = 1                        # boundary {(9,9),(9,10),(10,9),(10,10)}, radius 1
    pred = np.zeros((48, 64), np.uint8)
    pred[10, 10] = pred[30, 30] = 255     # 8 boundary pixels, 4 of them on the GT boundary
    assert boundary_f(gt, pred) == pytest.approx(2 * 0.5 * 1.0 / 1.5, abs=1e-15)


def test_f_edge_cases():
    empty = np.zeros((20, 30), np.uint8)
    square = empty.copy()
    square[5:10, 5:12] = 1
    far = empty.copy()
    far[15:18, 24:28] = 1
    assert boundary_f(empty, empty) == 1.0          # both boundaries empty
    assert boundary_f(empty, square) == 0.0         # only prediction
    assert boundary_f(square, empty) == 0.0         # only GT
    assert boundary_f(square, square * 255) == 1.0
    assert boundary_f(square, far) == 0.0           # P + R = 0
    full = np.ones((20, 30), np.uint8)
    assert boundary_f(full, empty) == 1.0           # a full mask has no boundary either (DAVIS quirk)


@pytest.mark.parametrize("shape", [(48, 64), (480, 854)])
def test_f_matches_bruteforce_oracle(shape):
    h, w = shape
    rng = np.random.default_rng(h)
    for _ in range(3 if h > 100 else 8):
        gt = blob(h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 2), rng.uniform(3, w / 2))
        pred = blob(h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 2), rng.uniform(3, w / 2))
        if h > 100:   # radius 8: shift the GT by a few pixels so that matches within the disk matter
            pred = np.roll(gt, (int(rng.integers(-12, 12)), int(rng.integers(-12, 12))), axis=(0, 1))
        # the pixel-loop boundary is too slow at 854×480; boundary_map is checked against it above
        expected = f_oracle(gt, pred, boundary_map if h > 100 else boundary_oracle)
        assert boundary_f(gt, pred * 255) == pytest.approx(expected, abs=1e-12)


# ---- A and R (§11.3) -------------------------------------------------------------------------------------------
def test_accuracy_counts_only_true_negatives():
    gt = np.array([[0, 0, 1, 1, 2, 0]], np.uint8)
    pred = np.array([[0, 255, 255, 0, 255, 0]], np.uint8)
    assert accuracy(gt, pred) == 2 / 6      # G == P only where both are 0


def test_robustness_uint8_wraparound_with_overlaps():
    gt = np.zeros((10, 10), np.uint8)
    gt[0, :4] = 2                           # overlap of two objects
    gt[1, :5] = 1
    gt[2, 0] = 3                            # three objects: (1 − 3) · 255 wraps to 2
    pred = np.zeros((10, 10), np.uint8)
    pred[0, :2] = 255                       # 2 pixels on G = 2 → 1 each
    pred[1, :5] = 255                       # on G = 1 → 0
    pred[5, :3] = 255                       # 3 pixels on background → 255 each
    pred[2, 0] = 255                        # G = 3 → 2
    fg = np.zeros((10, 10), np.uint8)
    fg[:4, :] = 1                           # ΣFG = 40
    neg = 2 * 1 + 3 * 255 + 2
    assert robustness(gt, pred, fg) == max(0.0, 1 - neg / (40 + 1e-6))
    fg[:, :] = 1
    fg[0, 0] = 0                            # ΣFG = 99 > neg? no: 769 → clamped at 0
    assert robustness(gt, pred, fg) == 0.0
    big_fg = np.ones((40, 40), np.uint8)    # a larger foreground: R = 1 − 769/1600
    gt2 = np.zeros((40, 40), np.uint8)
    gt2[:10, :10] = gt
    pred2 = np.zeros((40, 40), np.uint8)
    pred2[:10, :10] = pred
    assert robustness(gt2, pred2, big_fg) == 1 - 769 / (1600 + 1e-6)


def test_robustness_empty_foreground():
    gt = np.zeros((4, 4), np.uint8)
    fg = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    assert robustness(gt, pred, fg) == 1.0
    pred[0, 0] = 255
    assert robustness(gt, pred, fg) == 0.0


# ---- rounding and aggregation (§11.5) --------------------------------------------------------------------------
def test_expression_values_round_before_averaging():
    values = expression_values(0.123456, 0.5, a=0.98765, r=0.333333)
    assert values == {"J": 12.35, "F": 50.0, "JF": round(100 * (0.123456 + 0.5) / 2, 2), "A": 98.77, "R": 33.33}
    rows = [expression_values(0.0012345, 0.0012345), expression_values(0.0012345, 0.0012345)]
    assert aggregate(rows) == {"J": 0.12, "F": 0.12, "JF": 0.12}   # unrounded mean would give 0.12345


def test_aggregate_revos_mean_of_type_means_and_type2_excluded():
    rows = [
        {"J": 10.0, "F": 20.0, "A": 90.0, "R": 50.0, "type_id": 0},
        {"J": 30.0, "F": 40.0, "A": 80.0, "R": 70.0, "type_id": 0},
        {"J": 60.0, "F": 80.0, "A": 70.0, "R": 10.0, "type_id": 1},
        {"J": 99.0, "F": 99.0, "A": 99.0, "R": 99.0, "type_id": 2},
    ]
    result = aggregate_revos(rows)
    assert result["referring"] == {"J": 20.0, "F": 30.0, "A": 85.0, "R": 60.0, "JF": 25.0}
    assert result["reason"] == {"J": 60.0, "F": 80.0, "A": 70.0, "R": 10.0, "JF": 70.0}
    assert result["overall"] == {"J": 40.0, "F": 55.0, "A": 77.5, "R": 35.0, "JF": 47.5}
    assert list(result["overall"]) == ["J", "F", "A", "R", "JF"]
    coarse = aggregate_revos(rows, keys=("J", "F"))
    assert coarse["overall"] == {"J": 40.0, "F": 55.0, "JF": 47.5}


def test_aggregate_empty_subset_is_null():
    result = aggregate_revos([{"J": 1.0, "F": 1.0, "type_id": 0}], keys=("J", "F"))
    assert result["reason"] == {"J": None, "F": None, "JF": None}
    assert result["overall"] == {"J": None, "F": None, "JF": None}
