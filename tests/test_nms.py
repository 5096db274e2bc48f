"""The pure steps of SAM2 prompting against literal implementations (SPEC §8.3, §8.5–§8.7).

Candidate points must be bit-identical to a plain loop (T2). NMS is exercised on hand-built masks whose IoUs are
chosen to hit each quirk (a)–(e) of §8.5. The AC score and the selection are compared with plain-loop versions of
§8.6–§8.7 written here (float64 loops, so the AC comparison allows fp32 rounding).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model.sam.prompting as prompting
from model.sam.prompting import (Candidate, Tracklet, ac_scores, candidate_points, mask_iou, nms, select_tracklets,
                                 update_tracklets)

f32 = np.float32
WIDTH = 100  # masks are 1×WIDTH strips: an interval [a, b) of pixels makes IoUs easy to read


def strip(*intervals: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(1, WIDTH, dtype=torch.bool)
    for start, stop in intervals:
        mask[0, start:stop] = True
    return mask


def tracklet(mask: torch.Tensor, score: float, t: int = 0) -> Tracklet:
    """A tracklet on a one-frame clip whose mask on frame t is ``mask``."""
    return Tracklet(masks=mask[None].clone(), score=float(f32(score)), frame=t)


# ------------------------------------------------------------------------------------------ candidate points
def literal_candidates(phi: np.ndarray, threshold: float) -> list[list[tuple[int, int, float, float, float]]]:
    tau = f32(threshold)
    frames, height, width = phi.shape
    out = []
    for t in range(frames):
        cells = []
        for i in range(height):
            for j in range(width):
                value = f32(phi[t, i, j])
                if value >= tau:
                    cells.append((i, j, float(f32(j + 0.5) / f32(width)), float(f32(i + 0.5) / f32(height)),
                                  float(value)))
        out.append(cells)
    return out


@pytest.mark.parametrize("threshold", [0.8, 0.7, 0.35])
def test_candidate_points_match_literal_loop(threshold: float) -> None:
    rng = np.random.default_rng(1)
    phi = rng.random((3, 7, 11), dtype=np.float32)
    tau = f32(threshold)
    phi[0, 2, 3] = tau  # equal to the fp32 threshold: inclusive
    phi[0, 2, 4] = np.nextafter(tau, f32(0))  # one fp32 step below: excluded
    phi[1, 6, 10] = np.nextafter(tau, f32(1))
    phi[2] = 0.1  # a frame without candidates
    got = candidate_points(torch.from_numpy(phi), threshold)
    expected = literal_candidates(phi, threshold)
    assert [[(c.row, c.col, c.x, c.y, c.attention) for c in frame] for frame in got] == expected
    assert (2, 3) in [(c.row, c.col) for c in got[0]] and (2, 4) not in [(c.row, c.col) for c in got[0]]
    assert got[2] == []


def test_candidate_threshold_is_rounded_to_fp32() -> None:
    # 0.7 rounds down in fp32; Φ = fp32(0.7) is below the float64 0.7 but must count as reaching it
    phi = torch.zeros(1, 2, 2)
    phi[0, 1, 0] = float(f32(0.7))
    assert float(f32(0.7)) < 0.7
    (cells,) = candidate_points(phi, 0.7)
    assert [(c.row, c.col) for c in cells] == [(1, 0)]
    assert cells[0] == Candidate(row=1, col=0, x=float(f32(0.5) / f32(2)), y=float(f32(1.5) / f32(2)),
                                 attention=float(f32(0.7)))


# ------------------------------------------------------------------------------------------------- NMS
def test_mask_iou() -> None:
    assert mask_iou(strip((0, 10)), strip((0, 8))) == f32(8) / f32(10)
    assert mask_iou(strip(), strip()) == 0  # empty union
    assert mask_iou(strip((0, 10)), strip((3, 10))) == f32(0.7)  # exactly 0.7 in fp32: not "> 0.7"


def test_nms_suppresses_only_above_threshold_in_score_order() -> None:
    masks = torch.stack([strip((0, 10)), strip((3, 10)), strip((0, 8)), strip((50, 60))])
    scores = torch.tensor([1.0, 1.5, 1.2, 1.1])
    keep, delete_prev = nms(masks, scores, [], t=0)
    # order 1, 2, 3, 0: IoU(1, 0) is exactly 0.7 (no suppression), IoU(1, 2) = 0.5, IoU(2, 0) = 0.8 suppresses 0
    assert keep == [1, 2, 3]
    assert delete_prev == []


def test_nms_stable_sort_on_ties() -> None:
    masks = torch.stack([strip((0, 10)), strip((0, 9)), strip((0, 9))])
    keep, _ = nms(masks, torch.tensor([1.0, 1.3, 1.3]), [], t=0)
    assert keep == [1]  # the tie 1 vs 2 keeps candidate order: 1 wins and suppresses 2 (and 0)


def test_nms_quirk_a_suppressed_candidates_stay_lost() -> None:
    # A suppresses B, then A loses against an old tracklet: B is gone although it never met the tracklet
    masks = torch.stack([strip((0, 10)), strip((0, 9))])
    old = [tracklet(strip((0, 10)), 1.9)]
    keep, delete_prev = nms(masks, torch.tensor([1.5, 1.4]), old, t=0)
    assert keep == []
    assert delete_prev == []


def test_nms_quirk_b_deletions_before_the_drop_stand_and_quirk_e_discards_them() -> None:
    candidate = strip((0, 10))
    old = [tracklet(strip((0, 10)), 1.0), tracklet(strip((0, 9)), 1.8)]
    keep, delete_prev = nms(candidate[None], torch.tensor([1.5]), old, t=0)
    assert keep == []  # dropped at k = 1
    assert delete_prev == [0]  # recorded at k = 0 and kept
    # (e): without kept candidates the frame changes nothing, the deletion is discarded
    assert update_tracklets(old, delete_prev, []) == old


def test_nms_quirk_b_deletion_applies_when_another_candidate_is_kept() -> None:
    masks = torch.stack([strip((0, 10)), strip((60, 70))])
    old = [tracklet(strip((0, 10)), 1.0), tracklet(strip((0, 9)), 1.8), tracklet(strip((30, 40)), 1.0)]
    keep, delete_prev = nms(masks, torch.tensor([1.5, 1.2]), old, t=0)
    assert keep == [1]
    assert delete_prev == [0]
    new = [tracklet(masks[1], 1.2)]
    assert update_tracklets(old, delete_prev, new) == [old[1], old[2], new[0]]


def test_nms_quirk_c_tie_with_old_tracklet_keeps_the_old_one() -> None:
    old = [tracklet(strip((0, 10)), 1.25)]
    keep, delete_prev = nms(strip((0, 10))[None], torch.tensor([1.25]), old, t=0)
    assert (keep, delete_prev) == ([], [])
    keep, delete_prev = nms(strip((0, 10))[None], torch.tensor([float(np.nextafter(f32(1.25), f32(2)))]), old, t=0)
    assert (keep, delete_prev) == ([0], [0])


def test_nms_quirk_d_duplicate_deletions_remove_once() -> None:
    # A = [0, 75) and C = [25, 100) both overlap the old [0, 100) by 0.75 but each other only by 0.5
    masks = torch.stack([strip((0, 75)), strip((25, 100))])
    old = [tracklet(strip((0, 100)), 1.0), tracklet(strip((0, 5)), 1.0)]
    keep, delete_prev = nms(masks, torch.tensor([1.5, 1.4]), old, t=0)
    assert keep == [0, 1]
    assert delete_prev == [0, 0]
    new = [tracklet(masks[0], 1.5), tracklet(masks[1], 1.4)]
    assert update_tracklets(old, delete_prev, new) == [old[1], *new]


def test_nms_compares_with_the_tracklet_mask_of_frame_t() -> None:
    old = Tracklet(masks=torch.stack([strip((50, 60)), strip((0, 10))]), score=1.0, frame=0)
    candidate = strip((0, 10))[None]
    assert nms(candidate, torch.tensor([0.9]), [old], t=0) == ([0], [])
    assert nms(candidate, torch.tensor([0.9]), [old], t=1) == ([], [])


# ------------------------------------------------------------------------------------------ AC and selection
def literal_ac(phi: np.ndarray, tracklet_masks: list[np.ndarray]) -> list[float]:
    """SPEC §8.6 as written, with explicit adaptive-pooling windows, in float64 loops."""
    frames, height, width = phi.shape
    big_h, big_w = tracklet_masks[0].shape[1:]
    denominator, reward = 0.0, np.zeros(phi.shape)
    for t in range(frames):
        mean = sum(float(v) for v in phi[t].ravel()) / (height * width)
        foreground = [(i, j) for i in range(height) for j in range(width) if phi[t, i, j] > mean]
        peak = max((float(phi[t, i, j]) for i, j in foreground), default=0.0)
        for i in range(height):
            for j in range(width):
                reward[t, i, j] = phi[t, i, j] if (i, j) in foreground else -peak
        denominator += sum(float(phi[t, i, j]) for i, j in foreground)
    raw = []
    for masks in tracklet_masks:
        total = 0.0
        for t in range(frames):
            for i in range(height):
                rows = range(math.floor(i * big_h / height), math.ceil((i + 1) * big_h / height))
                for j in range(width):
                    cols = range(math.floor(j * big_w / width), math.ceil((j + 1) * big_w / width))
                    pooled = sum(float(masks[t, r, c]) for r in rows for c in cols) / (len(rows) * len(cols))
                    total += pooled * reward[t, i, j]
        raw.append(total / (denominator + 1e-8))
    best = max((value for value in raw if value > 0), default=None)
    return [value / (best + 1e-8) if best is not None and value > 0 else value for value in raw]


def test_pooling_windows_overlap_for_the_test_sizes() -> None:
    # H₀ = 23 is not a multiple of h_f = 5: adjacent windows share a row, which the literal AC must reproduce
    windows = [range(math.floor(i * 23 / 5), math.ceil((i + 1) * 23 / 5)) for i in range(5)]
    assert any(set(a) & set(b) for a, b in zip(windows, windows[1:]))
    mask = torch.zeros(1, 23, 37)
    mask[0, 4, :] = 1  # row 4 lies in windows 0 and 1
    pooled = F.adaptive_avg_pool2d(mask, (5, 7))
    assert (pooled[0, 0] > 0).all() and (pooled[0, 1] > 0).all()


def test_ac_scores_match_literal_loops() -> None:
    rng = np.random.default_rng(2)
    frames, height, width, big_h, big_w = 4, 5, 7, 23, 37
    phi = rng.random((frames, height, width), dtype=np.float32)
    phi[2] = 0.0  # a constant frame has no foreground and no penalty
    masks = []
    for _ in range(5):
        masks.append(rng.random((frames, big_h, big_w)) < rng.uniform(0.05, 0.6))
    foreground = torch.from_numpy(phi) > torch.from_numpy(phi).mean(dim=(1, 2), keepdim=True)
    masks.append(F.interpolate(foreground[:, None].float(), size=(big_h, big_w))[:, 0].numpy() > 0.5)  # positive
    masks.append(np.zeros((frames, big_h, big_w), dtype=bool))  # empty tracklet: AC 0
    got = ac_scores(torch.from_numpy(phi), [torch.from_numpy(m) for m in masks])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), literal_ac(phi, masks), rtol=1e-5, atol=1e-7)
    assert got[-1] == 0
    assert float(got.max()) == pytest.approx(1.0, abs=1e-6)  # the best positive tracklet is normalised to ≈ 1


def test_ac_denominator_is_the_sum_over_foreground_cells_to_the_last_bit() -> None:
    """D = Σ_t Σ_{B_t} Φ_t (SPEC §8.6) equals, bit for bit, the fp32 sum of the foreground values taken one by one
    in row-major order; the old where(B, Φ, 0).sum() differs in the last bit for a large share of these maps."""
    rng = np.random.default_rng(5)
    where_differs = 0
    for _ in range(300):
        frames, height, width = (int(n) for n in rng.integers([1, 2, 2], [17, 30, 53]))
        phi = torch.from_numpy(rng.random((frames, height, width), dtype=np.float32) ** rng.uniform(0.5, 4))
        mean = phi.mean(dim=(1, 2), keepdim=True)
        selected = [value for value, above in zip(phi.flatten().tolist(), (phi > mean).flatten().tolist()) if above]
        literal = torch.tensor(selected, dtype=torch.float32).sum()
        foreground, denominator = prompting._foreground_mass(phi)
        assert torch.equal(foreground, phi > mean)
        assert denominator.dtype == torch.float32 and denominator.item() == literal.item()
        where_differs += torch.where(foreground, phi, torch.zeros_like(phi)).sum().item() != literal.item()
    assert where_differs > 30  # the test would catch a return to the old formula


def test_ac_scores_negative_only_are_not_normalised() -> None:
    frames, height, width = 2, 4, 5
    phi = np.full((frames, height, width), 0.01, dtype=np.float32)
    phi[:, 1, 1] = 1.0  # one foreground cell per frame
    background = np.ones((frames, 8, 10), dtype=bool)
    background[:, 2:4, 2:4] = False  # everything except the hot cell
    corner = np.zeros((frames, 8, 10), dtype=bool)
    corner[:, 7:, 9:] = True  # a quarter of one background cell
    masks = [background, corner]
    got = ac_scores(torch.from_numpy(phi), [torch.from_numpy(m) for m in masks])
    np.testing.assert_allclose(got.numpy(), literal_ac(phi, masks), rtol=1e-5)
    assert float(got[0]) < -10  # unnormalised: far below −1
    assert -1 < float(got[1]) < 0


def literal_select(scores: list[float], ac: list[float], threshold: float) -> list[int]:
    final = [(f32(s) + f32(a)) / f32(3) for s, a in zip(scores, ac)]
    selected = [m for m, value in enumerate(final) if value > f32(threshold)]
    if selected:
        return selected
    best = 0
    for m, value in enumerate(final):
        if float(value) > float(final[best]):
            best = m
    return [best]


@pytest.mark.parametrize("scores, ac, threshold, expected", [
    ([1.9, 1.2, 1.8], [1.0, 1.0, 0.7], 0.8, [0, 2]),
    ([float(f32(2.4)), 1.5], [0.0, 0.0], 0.8, [0]),  # final == fp32(0.8) exactly: strict, so fallback to 0
    ([1.3, 1.6, 1.6, 0.9], [-0.7, -0.2, -0.2, 0.2], 0.8, [1]),  # fallback: tie between 1 and 2, first wins
    ([1.5, 1.7], [-25.0, -3.0], 0.8, [1]),  # unnormalised negative AC
    ([1.5, 1.7], [-25.0, -3.0], -2.0, [1]),
    ([1.0], [0.2], 0.8, [0]),  # a single tracklet is always chosen
])
def test_select_tracklets_matches_literal(scores, ac, threshold, expected) -> None:
    got = select_tracklets([float(f32(s)) for s in scores], torch.tensor(ac, dtype=torch.float32), threshold)
    assert got == literal_select(scores, ac, threshold) == expected
