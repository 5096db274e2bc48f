"""Dense masks from the fused map Φ with SAM2 prompts (SPEC §8, pseudocode §8.12).

1. Candidate points: every cell with Φ ≥ τ_pq is one positive point (§8.3).
2. Phase 1, on the T sampled frames: each frame's candidates are decoded, scored (IoU prediction + attention),
   filtered by the reference's NMS against each other and the earlier tracklets, and each kept mask is tracked
   forward then backward through the sampled clip (§8.4, §8.5).
3. Attention-consistency score and selection of the tracklets (§8.6, §8.7).
4. Phase 2, on all F frames: each selected tracklet's own mask at its prompt frame is tracked forward then
   backward through the whole video; the output is the union (§8.8).

Two permitted equivalent computations (§8.10) make this cheaper than the reference: every candidate point and
every mask prompt is its own object with its own memory bank, tracked independently (objects never interact in this
SAM2 version, and this avoids re-consolidating all objects after each add call), and with a :class:`FeatureCache`
each frame of a video is encoded at most once for all phases and expressions. Both give identical masks (T3).

Objects can also run through SAM2 as a batch (``batch_size``, ``--sam2_batch``): a frame's candidate points through
one prompt-encoder and mask-decoder call, a frame's kept masks or a group's prompts tracked as one batch of
objects. The steps are the stock ones, but PyTorch's kernels are not batch-invariant (a GEMM over N objects may
round differently from N GEMMs over one), so logits differ in the last bits and a pixel on the 0.5 boundary can
flip; batch size 1, the per-object computation, is therefore the default (see ``docs/benchmarks.md``).

The pure steps (:func:`candidate_points`, :func:`nms`, :func:`update_tracklets`, :func:`ac_scores`,
:func:`select_tracklets`) are separate functions so that they can be checked against literal implementations.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.sam import DEFAULT_SAM2_BATCH
from model.sam.predictor import (DecafSAM2Predictor, FeatureCache, load_sam2_predictor, resolve_sam2_config,
                                 sam2_extension_loaded)
from model.utils.errors import DecafError
from model.utils.paths import DEFAULT_THRESHOLD
from model.utils.video import check_frame_sizes

__all__ = ["Candidate", "DecafSAM2Predictor", "FeatureCache", "SamPromptResult", "Tracklet", "ac_scores",
           "candidate_points", "load_sam2_predictor", "mask_iou", "nms", "resolve_sam2_config", "sam2_masks",
           "sam2_extension_loaded", "select_tracklets", "update_tracklets"]

log = logging.getLogger(__name__)

#: NMS overlap threshold, compared strictly in fp32 (SPEC §8.5)
NMS_IOU_THRESHOLD = np.float32(0.7)
NO_CANDIDATE = "no candidate point"


@dataclass(frozen=True)
class Candidate:
    """One candidate point (SPEC §8.3): cell (row, col) of its frame, relative centre (x, y) and Φ there."""

    row: int
    col: int
    x: float  # (col + 0.5) / w_f, an fp32 value
    y: float  # (row + 0.5) / h_f, an fp32 value
    attention: float  # a_c = Φ[t, row, col], an fp32 value


@dataclass
class Tracklet:
    """A phase-1 tracklet (SPEC §8.4): its masks on the T sampled frames, its score and its prompt frame."""

    masks: torch.Tensor  # bool (T, H₀, W₀), CPU
    score: float  # s = u + a, an fp32 value
    frame: int  # sampled-frame index t of its prompt


@dataclass
class SamPromptResult:
    """The dense masks of one expression (SPEC §8.8) and what happened on the way."""

    masks: np.ndarray  # uint8 (F, H₀, W₀), values {0, 255}, every frame
    degenerate: str | None  # why the masks are empty by rule (SPEC §8.9), e.g. "no candidate point"
    num_candidates: int
    num_tracklets: int  # surviving phase-1 tracklets
    selected: list[int]  # indices into the surviving tracklets, in tracklet-list order
    encoder_calls: int  # image-encoder passes this call made (frames the feature cache already held cost none)


def _check_phi(phi: torch.Tensor) -> None:
    if not isinstance(phi, torch.Tensor) or phi.dim() != 3 or phi.dtype != torch.float32:
        raise ValueError(f"Φ must be an fp32 tensor (T, h_f, w_f), got {getattr(phi, 'dtype', type(phi))} "
                         f"{tuple(getattr(phi, 'shape', ()))}")


def candidate_points(phi: torch.Tensor, threshold: float) -> list[list[Candidate]]:
    """The candidate points of every sampled frame, SPEC §8.3.

    A cell is a candidate when Φ[t, i, j] ≥ τ_pq, tested inclusively in fp32 (τ_pq rounded to fp32). A frame's
    candidates are in row-major (i, j) order; each is the relative cell centre ((j + 0.5)/w_f, (i + 0.5)/h_f) in
    fp32. No cap, no peak picking.
    """
    _check_phi(phi)
    phi = phi.detach().cpu()
    _, height, width = phi.shape
    hot = phi >= torch.tensor(threshold, dtype=torch.float32)
    candidates = []
    for t in range(phi.shape[0]):
        cells = torch.nonzero(hot[t]).tolist()  # row-major
        candidates.append([
            Candidate(row=i, col=j, x=float(np.float32(j + 0.5) / np.float32(width)),
                      y=float(np.float32(i + 0.5) / np.float32(height)), attention=float(phi[t, i, j]))
            for i, j in cells])
    return candidates


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> np.float32:
    """|a ∧ b| / |a ∨ b| of two boolean masks with the pixel counts in fp32; 0 when the union is empty (§8.5)."""
    union = np.float32(torch.logical_or(a, b).sum().item())
    if union == 0:
        return np.float32(0.0)
    return np.float32(torch.logical_and(a, b).sum().item()) / union


def nms(masks: torch.Tensor, scores: Sequence[float] | torch.Tensor, tracklets: Sequence[Tracklet],
        t: int) -> tuple[list[int], list[int]]:
    """The reference's NMS on frame t, SPEC §8.5, with all its quirks.

    ``masks`` (N_t, H₀, W₀) bool and ``scores`` (N_t) are the frame's candidates; the tracklets are compared by
    their mask on frame ``t``. Returns ``keep`` (candidates, descending score) and ``delete_prev`` (tracklet
    indices, possibly repeated). Quirks kept: (a) a candidate suppresses lower-scored candidates before it is
    checked against the tracklets, and they stay suppressed if it is then dropped; (b) deletions recorded before
    the candidate is dropped stand; (c) on a score tie the old tracklet wins; (d) ``delete_prev`` may repeat an
    index; (e) is applied by :func:`update_tracklets`. The sort is stable (ties keep candidate order).
    """
    score_values = [float(score) for score in scores]
    count = len(score_values)
    order = sorted(range(count), key=score_values.__getitem__, reverse=True)  # stable in Python
    keep: list[int] = []
    suppressed = [False] * count
    delete_prev: list[int] = []
    for a in range(count):
        if suppressed[a]:
            continue
        i = order[a]
        keep.append(i)
        for b in range(a + 1, count):
            if not suppressed[b] and mask_iou(masks[i], masks[order[b]]) > NMS_IOU_THRESHOLD:
                suppressed[b] = True
        for k, tracklet in enumerate(tracklets):
            if mask_iou(masks[i], tracklet.masks[t]) > NMS_IOU_THRESHOLD:
                if score_values[i] > tracklet.score:
                    delete_prev.append(k)
                else:
                    keep.pop()  # removes i
                    break
    return keep, delete_prev


def update_tracklets(tracklets: Sequence[Tracklet], delete_prev: Sequence[int],
                     new_tracklets: Sequence[Tracklet]) -> list[Tracklet]:
    """The tracklet list after one frame, SPEC §8.4 steps 5 and 9.

    Without new tracklets (``keep`` was empty) nothing changes and ``delete_prev`` is discarded, quirk (e).
    Otherwise the tracklets whose index (before this frame) is in ``delete_prev`` go, then the new ones follow in
    ``keep`` order.
    """
    if not new_tracklets:
        return list(tracklets)
    deleted = set(delete_prev)
    return [tracklet for k, tracklet in enumerate(tracklets) if k not in deleted] + list(new_tracklets)


def _foreground_mass(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground cells B_t = {Φ_t > μ_t} (T, h_f, w_f) and D = Σ_t Σ_{B_t} Φ_t in fp32 (SPEC §8.6).

    D is summed over the selected cells only, ``Φ[B].sum()`` as the reference does; summing ``where(B, Φ, 0)``
    over all cells adds the same values in another order and differs in the last bit for many maps.
    """
    foreground = phi > phi.mean(dim=(1, 2), keepdim=True)
    return foreground, phi[foreground].sum()


def ac_scores(phi: torch.Tensor, tracklet_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention-consistency score of each tracklet, SPEC §8.6, in fp32: a tensor (num_tracklets,).

    Per frame, the foreground is Φ_t > mean(Φ_t) (strict) and the reward map is Φ_t there and −max(foreground)
    elsewhere (0 for a frame without foreground). A tracklet's masks (T, H₀, W₀) are average-pooled to the map grid
    with ``adaptive_avg_pool2d`` (overlapping windows when H₀ is not a multiple of h_f), multiplied by the reward
    and summed over all T frames, then divided by the foreground mass of the whole clip (+1e-8). Positive scores
    are divided by the largest one (+1e-8); the others stay unnormalised.
    """
    _check_phi(phi)
    phi = phi.detach().cpu()
    if not tracklet_masks:
        return torch.zeros(0, dtype=torch.float32)
    num_frames, height, width = phi.shape
    foreground, denominator = _foreground_mass(phi)
    peak = torch.where(foreground, phi, torch.full_like(phi, -torch.inf)).amax(dim=(1, 2))
    peak = torch.where(foreground.flatten(1).any(dim=1), peak, torch.zeros_like(peak))
    reward = torch.where(foreground, phi, -peak[:, None, None])
    raw = []
    for masks in tracklet_masks:
        if masks.shape[0] != num_frames:
            raise ValueError(f"tracklet masks cover {masks.shape[0]} frames, Φ has {num_frames}")
        pooled = F.adaptive_avg_pool2d(masks.cpu().float(), (height, width))
        raw.append((pooled * reward).sum() / (denominator + 1e-8))
    raw_scores = torch.stack(raw)
    positive = raw_scores > 0
    if not positive.any():
        return raw_scores
    return torch.where(positive, raw_scores / (raw_scores[positive].max() + 1e-8), raw_scores)


def select_tracklets(scores: Sequence[float] | torch.Tensor, ac: torch.Tensor, threshold: float) -> list[int]:
    """The tracklets to prompt phase 2 with, SPEC §8.7.

    final = (s + AC) / 3 in fp32; every tracklet with final > τ_trk (strict, τ_trk rounded to fp32), in list
    order; if none passes, the single tracklet with the highest final score (the first one on a tie).
    """
    final = (torch.as_tensor(scores, dtype=torch.float32).cpu() + ac.float().cpu()) / 3
    if final.numel() == 0:
        return []
    passes = final > torch.tensor(threshold, dtype=torch.float32)
    selected = [m for m in range(final.numel()) if bool(passes[m])]
    if selected:
        return selected
    values = final.tolist()
    return [max(range(len(values)), key=values.__getitem__)]


def _binarize(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(ℓ) > 0.5 in fp32 (not ℓ > 0, SPEC §8.4 step 2), moved to the CPU."""
    return (torch.sigmoid(logits) > 0.5).cpu()


def _open_session(predictor: DecafSAM2Predictor, frame_paths: list[Path], video_frame_indices: Sequence[int],
                  features: FeatureCache | None) -> dict[str, Any]:
    """A SAM2 session whose frame i is video frame ``video_frame_indices[i]`` (phase 1: k_t; phase 2: all)."""
    if features is not None:
        return predictor.init_state_from_cache(features, video_frame_indices)
    # the uncached computation: frames decoded into the session, features from the stock one-frame cache
    return predictor.init_state_from_frames([frame_paths[index] for index in video_frame_indices])


def _chunks(count: int, size: int) -> Iterator[range]:
    return (range(begin, min(begin + size, count)) for begin in range(0, count, size))


def _decode_points(predictor: DecafSAM2Predictor, session: dict[str, Any], t: int,
                   candidates: Sequence[Candidate], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point masks m_c (N_t, H₀, W₀) and best-IoU predictions u_c (N_t) of one frame's candidates (§8.4 step 2).

    Each point is its own object on an initial conditioning frame without memory (§8.10); ``batch_size`` of them
    go through the prompt encoder and mask decoder together. The mask is the video-resolution upsampling of the
    hole-filled low-resolution logits, as the reference's consolidated output of its last add call holds it.
    SAM2 receives the relative coordinates times its image size.
    """
    points = torch.tensor([[candidate.x, candidate.y] for candidate in candidates], dtype=torch.float32)
    masks, ious = [], []
    for chunk in _chunks(len(candidates), batch_size):
        logits, best_ious = predictor.decode_points(session, t, points[chunk.start:chunk.stop])
        masks.append(_binarize(logits))
        ious.append(best_ious.float().cpu())
    return torch.cat(masks), torch.cat(ious)


def _track(predictor: DecafSAM2Predictor, session: dict[str, Any], frame: int, prompts: torch.Tensor,
           batch_size: int) -> Iterator[tuple[range, int, torch.Tensor]]:
    """Track mask prompts (N, H₀, W₀) of one frame, ``batch_size`` objects at a time (§8.4 steps 6–8, §8.8).

    Yields (objects, session frame, bool masks (len(objects), H₀, W₀)): forward from the prompt frame to the end,
    then backward from the frame before it to frame 0 without reset (§8.4 step 7).
    """
    for chunk in _chunks(prompts.shape[0], batch_size):
        for index, logits in predictor.track_masks(session, frame, prompts[chunk.start:chunk.stop]):
            yield chunk, index, _binarize(logits)


def _phase1_tracklets(predictor: DecafSAM2Predictor, session: dict[str, Any], candidates: list[list[Candidate]],
                      video_size: tuple[int, int], batch_size: int = 1, progress: bool = False) -> list[Tracklet]:
    """Phase 1 on the sampled clip, SPEC §8.4: the surviving tracklets in list order."""
    num_frames = len(candidates)
    tracklets: list[Tracklet] = []
    for t in tqdm(range(num_frames), desc="SAM2 phase 1", unit="key frame", disable=not progress, leave=False,
                  dynamic_ncols=True):
        frame_candidates = candidates[t]
        if not frame_candidates:
            continue
        point_masks, ious = _decode_points(predictor, session, t, frame_candidates, batch_size)
        attention = torch.tensor([candidate.attention for candidate in frame_candidates], dtype=torch.float32)
        scores = ious + attention  # s_c = u_c + a_c in fp32 (step 3)
        keep, delete_prev = nms(point_masks, scores, tracklets, t)
        masks = torch.zeros((len(keep), num_frames, *video_size), dtype=torch.bool)
        for objects, index, tracked in _track(predictor, session, t, point_masks[keep], batch_size):
            masks[objects.start:objects.stop, index] = tracked
        new_tracklets = [Tracklet(masks=masks[r], score=float(scores[c]), frame=t) for r, c in enumerate(keep)]
        tracklets = update_tracklets(tracklets, delete_prev, new_tracklets)
    return tracklets


def _phase2_union(predictor: DecafSAM2Predictor, session: dict[str, Any], prompts: Sequence[tuple[int, torch.Tensor]],
                  video_size: tuple[int, int], batch_size: int = 1, progress: bool = False) -> np.ndarray:
    """Phase 2, SPEC §8.8: the union over all prompts of their tracked masks, uint8 (F, H₀, W₀) in {0, 255}.

    The prompts are grouped by video frame in order of first appearance; a group's prompts are tracked as a batch
    of independent objects (§8.10), and the union does not depend on the order.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for frame, mask in prompts:
        groups.setdefault(frame, []).append(mask)
    union = torch.zeros((session["num_frames"], *video_size), dtype=torch.bool)
    for frame, masks in tqdm(groups.items(), desc="SAM2 phase 2", unit="prompt group", disable=not progress,
                             leave=False, dynamic_ncols=True):
        for _, index, tracked in _track(predictor, session, frame, torch.stack(masks), batch_size):
            union[index] |= tracked.any(dim=0)
    return union.numpy().astype(np.uint8) * np.uint8(255)


def _check_job(phi: torch.Tensor, frame_paths: list[Path], key_frame_indices: Sequence[int]) -> None:
    _check_phi(phi)
    if not frame_paths:
        raise DecafError("SAM2 prompting needs the frames of the video, got none")
    if phi.shape[0] != len(key_frame_indices) or not key_frame_indices:
        raise ValueError(f"Φ has {phi.shape[0]} frames but {len(key_frame_indices)} key-frame indices were given")
    bad = [index for index in key_frame_indices if not 0 <= index < len(frame_paths)]
    if bad:
        raise DecafError(f"key-frame index {bad[0]} is outside the {len(frame_paths)} frames of "
                         f"{frame_paths[0].parent}; the attention cache does not match this video")


def sam2_masks(predictor: DecafSAM2Predictor, phi: torch.Tensor, frame_paths: list[Path],
               key_frame_indices: list[int], *, point_threshold: float = DEFAULT_THRESHOLD,
               final_score_threshold: float = DEFAULT_THRESHOLD,
               cached_features: bool = True, batch_size: int = DEFAULT_SAM2_BATCH,
               progress: bool = False) -> SamPromptResult:
    """Dense masks of one expression on every frame of its video, SPEC §8.

    ``phi`` is the fused map (T, h_f, w_f), fp32 in [0, 1]; ``frame_paths`` are all F frames of the video in
    order; ``key_frame_indices`` the T sampled indices k_t. With ``cached_features`` the frames become the
    predictor's current video (:meth:`DecafSAM2Predictor.set_video`), so encoder outputs are reused across phases
    and across the expressions of a video; without, every session encodes its frames as the stock predictor does
    (the reference computation). Both give identical masks (T3). ``batch_size`` objects (candidate points, kept
    masks, a group's prompts) run through SAM2 together; 1 is the per-object computation. ``progress`` shows a
    transient bar per phase. Without any candidate point the masks are all zero, with a warning and
    ``degenerate`` set (§8.9).
    """
    if batch_size < 1:
        raise DecafError(f"the SAM2 batch size must be a positive integer, got {batch_size}")
    frame_paths = [Path(path) for path in frame_paths]
    key_frame_indices = [int(index) for index in key_frame_indices]
    _check_job(phi, frame_paths, key_frame_indices)
    phi = phi.detach().cpu()
    features = predictor.set_video(frame_paths) if cached_features else None
    video_size = features.video_size if features is not None else check_frame_sizes(frame_paths)
    candidates = candidate_points(phi, point_threshold)
    num_candidates = sum(len(frame_candidates) for frame_candidates in candidates)
    if num_candidates == 0:
        log.warning("%s: no cell of the fused map reaches --point_threshold %g; writing empty masks for all %d "
                    "frames (SPEC §8.9)", frame_paths[0].parent, point_threshold, len(frame_paths))
        empty = np.zeros((len(frame_paths), *video_size), dtype=np.uint8)
        return SamPromptResult(empty, NO_CANDIDATE, 0, 0, [], 0)

    encoder_calls_before = predictor.encoder_calls
    # SAM2 runs in fp32: make sure no caller's autocast region reaches it (SPEC §8.1)
    with torch.inference_mode(), torch.autocast(predictor.device.type, enabled=False):
        sampled_session = _open_session(predictor, frame_paths, key_frame_indices, features)
        tracklets = _phase1_tracklets(predictor, sampled_session, candidates, video_size, batch_size, progress)
        del sampled_session
        ac = ac_scores(phi, [tracklet.masks for tracklet in tracklets])
        selected = select_tracklets([tracklet.score for tracklet in tracklets], ac, final_score_threshold)
        # the prompt is the tracklet's own propagated mask at its prompt frame, placed at video frame k_t (§8.7)
        prompts = [(key_frame_indices[tracklets[m].frame], tracklets[m].masks[tracklets[m].frame])
                   for m in selected]
        video_session = _open_session(predictor, frame_paths, range(len(frame_paths)), features)
        masks = _phase2_union(predictor, video_session, prompts, video_size, batch_size, progress)
    log.debug("%s: %d candidates, %d tracklets, selected %s", frame_paths[0].parent, num_candidates,
              len(tracklets), selected)
    return SamPromptResult(masks, None, num_candidates, len(tracklets), selected,
                           predictor.encoder_calls - encoder_calls_before)
