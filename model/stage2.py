"""Stage 2 (coarse and SAM2 masks) and the keypoint branch over a benchmark (SPEC §1.1, §6–§9, §10.9, §12).

Both commands read one attention cache per job, check it against the frame folder as it is now (§12.2), fuse it into
Φ (§6) and write their outputs atomically (§12.6). Jobs are sharded over the full list first and finished jobs
skipped inside the shard (§10.9); they run grouped by video, so the SAM2 image features of a video are computed once
for all its expressions (§8.10). Each output is computed under a claim (:func:`model.utils.atomic.output_claim`), so
concurrent processes on one output folder never compute it twice. The model family always comes from the cache (§14
#27).

The scripts ``inference_attn_mask.py`` and ``inference_keypoints.py`` parse their flags with :mod:`model.parsers`
and call :func:`run_masks` and :func:`run_keypoints`; :func:`run_mask_job` and :func:`run_keypoint_job` are the
per-job Python API. SAM2 (and its Hydra stack) is imported only when SAM masks are asked for, so coarse masks and
keypoints start quickly.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from model.adapters.base import layer_count, read_checkpoint_config, resolve_layer_range
from model.cache import AttentionCache, check_against_frames, expected_meta, load_cache, setting_mismatches
from model.jobs.benchmarks import (Job, dataset_files, frame_mismatch, group_by_video, list_jobs, shard_from_env,
                                   shard_jobs)
from model.jobs.runner import JobRunner, Outcome
from model.maps.coarse_masks import coarse_masks
from model.maps.fusion import fuse_cache
from model.maps.keypoints import KEYPOINTS_FILE, extract_keypoints, save_keypoints
from model.parsers import build_keypoint_parser, build_mask_parser
from model.sam import DEFAULT_SAM2_BATCH
from model.settings import default_device, model_name_of
from model.utils.atomic import check_writable_folder
from model.utils.errors import DecafError
from model.utils.mask_png import write_mask_folder
from model.utils.paths import DEFAULT_THRESHOLD, cache_file_name, cache_folder, output_folder, output_kind, run_folder
from model.utils.run_record import RunRecord
from model.utils.video import check_frame_sizes, frame_name, list_frames, read_frame_size, sample_indices

log = logging.getLogger("decaf.stage2")

ATTN_MASK, SAM_MASK, KEYPOINT = "attn-mask", "sam-mask", "keypoint"


# ----------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunSettings:
    """What a cache must have been made with, and how it is fused (SPEC §12.2, §6.7)."""

    num_input_frames: int
    layer_start: int  # resolved (an explicit value, or 'auto' resolved from --version's config)
    layer_end_arg: int  # as given: ≤ 0 means the last layer
    prompt_versions: tuple[int, int, int]  # (obj, bg, choice)
    num_layers: int | None = None  # from --version's config, when it was read
    no_background: bool = False
    fusion: str = "both"

    def expected_meta(self, cache: AttentionCache) -> dict[str, Any]:
        """The recorded settings this run requires of ``cache``."""
        num_layers = self.num_layers if self.num_layers is not None else cache.meta.get("num_layers")
        if not isinstance(num_layers, int):
            raise DecafError(f"{cache.path}: metadata lacks num_layers; rerun stage 1 with --overwrite")
        _, end = resolve_layer_range(num_layers, self.layer_start, self.layer_end_arg)
        return expected_meta(num_input_frames=self.num_input_frames, layer_start=self.layer_start, layer_end=end,
                             prompt_versions=self.prompt_versions, num_layers=self.num_layers)


def resolve_run_settings(args: argparse.Namespace) -> RunSettings:
    """Settings from the flags; ``--attn_layer_idx_start auto`` reads the depth from ``--version``'s config."""
    if args.num_input_frames < 1:
        raise DecafError(f"--num_input_frames must be positive, got {args.num_input_frames}")
    num_layers = None
    start = args.attn_layer_idx_start
    if start == "auto":
        if not args.version:
            raise DecafError("--attn_layer_idx_start auto needs --version to read the model depth from its "
                             "config.json; pass --version or an explicit --attn_layer_idx_start (e.g. 14)")
        try:
            num_layers = layer_count(read_checkpoint_config(args.version))
        except DecafError as exc:
            raise DecafError(f"{exc}; it is read only to resolve --attn_layer_idx_start auto, so an explicit "
                             f"value (e.g. 14) also works") from exc
        start = resolve_layer_range(num_layers, "auto", args.attn_layer_idx_end)[0]
    return RunSettings(num_input_frames=args.num_input_frames, layer_start=start,
                       layer_end_arg=args.attn_layer_idx_end,
                       prompt_versions=(args.prompt_obj_ver, args.prompt_bg_ver, args.prompt_obj_cnt_ver),
                       num_layers=num_layers, no_background=args.no_background, fusion=args.fusion)


@dataclass(frozen=True)
class Layout:
    """Where a run reads caches and writes outputs (SPEC §12.2–§12.3)."""

    cache_dirs: tuple[Path, ...]  # searched in order; the first one names a missing cache
    outputs: dict[str, Path]  # output kind → folder holding <video key>/<exp_id>/

    def cache_path(self, vid_name: str, exp_id: str) -> Path:
        name = cache_file_name(vid_name, exp_id)
        return next((folder / name for folder in self.cache_dirs if (folder / name).is_file()),
                    self.cache_dirs[0] / name)


def resolve_layout(args: argparse.Namespace, settings: RunSettings, kinds: Sequence[str],
                   point_threshold: float = DEFAULT_THRESHOLD,
                   final_score_threshold: float = DEFAULT_THRESHOLD) -> Layout:
    """Cache folders (``--attn_save_path`` or §12.2) and one output folder per kind (``--vis_save_path`` or §12.3).

    With ``--no_background`` and no ``--attn_save_path`` a job's cache is looked up in the main run folder, then
    in its ``_obj-only`` sibling: both hold the same object maps (calls 1–2), and Φ ignores the background.
    """
    folder_args = (settings.num_input_frames, settings.layer_start, settings.layer_end_arg, settings.prompt_versions)
    if args.attn_save_path:
        cache_dirs: tuple[Path, ...] = (Path(args.attn_save_path),)
    else:
        variants = (False, True) if settings.no_background else (False,)
        cache_dirs = tuple(cache_folder(model_name_of(args.model_name, args.version), run_folder(*folder_args, obj_only=obj_only),
                                        args.dataset, args.testset) for obj_only in variants)
    names = {kind: output_kind(kind, point_threshold, final_score_threshold, settings.no_background,
                               settings.fusion) for kind in kinds}
    if args.vis_save_path:
        root = Path(args.vis_save_path)
        # two kinds never share a folder (SPEC §7.5, §14 #40)
        outputs = {kind: root if len(kinds) == 1 else root / names[kind] for kind in kinds}
    else:
        outputs = {kind: output_folder(model_name_of(args.model_name, args.version), run_folder(*folder_args), settings.num_input_frames,
                                       names[kind], args.dataset, args.testset) for kind in kinds}
    return Layout(cache_dirs, outputs)


# ------------------------------------------------------------------------------------------------ one video/job
@dataclass(frozen=True)
class VideoFrames:
    """A video's frame files as they are now, with the sampling and size stage 1 must have seen (§2.2–§2.4)."""

    folder: Path
    frames: list[Path]
    key_frame_indices: list[int]
    frame0_size: tuple[int, int]

    @classmethod
    def read(cls, folder: str | Path, num_input_frames: int, frames: list[Path] | None = None,
             check_all_sizes: bool = True) -> VideoFrames:
        """List (or take) the frames; ``check_all_sizes`` reads every header (§2.4), else frame 0's only."""
        frames = list_frames(folder) if frames is None else frames
        size = check_frame_sizes(frames) if check_all_sizes else read_frame_size(frames[0])
        return cls(Path(folder), frames, sample_indices(len(frames), num_input_frames), size)

    @property
    def names(self) -> list[str]:
        return [frame_name(path) for path in self.frames]


@dataclass
class SamPrompting:
    """A loaded SAM2 predictor, the two thresholds of SPEC §8.3 and §8.7, and how objects are batched."""

    predictor: Any
    point_threshold: float = DEFAULT_THRESHOLD
    final_score_threshold: float = DEFAULT_THRESHOLD
    batch_size: int = DEFAULT_SAM2_BATCH  # SAM2 objects per batch (--sam2_batch)
    progress: bool = False  # transient per-phase progress bars


@dataclass
class JobOutcome(Outcome):
    """What one job did (:class:`~model.jobs.runner.Outcome`), and the model family its cache records."""

    family: str = ""


def load_job_cache(cache_path: str | Path, video: VideoFrames, settings: RunSettings,
                   job: Job | None = None) -> AttentionCache:
    """Load a cache and check it against this run's settings, the job and the frame folder now (SPEC §12.2)."""
    cache = load_cache(cache_path)
    expected = settings.expected_meta(cache)
    diffs = setting_mismatches(cache.meta, expected)
    if diffs:
        detail = ", ".join(f"{key} {cache.meta.get(key)!r} (this run: {expected[key]!r})" for key in diffs)
        raise DecafError(f"{cache.path} was made with other settings: {detail}; point --attn_save_path at the "
                         f"matching cache folder or rerun stage 1")
    if job is not None:
        for key in ("dataset", "video_key", "exp_id"):
            recorded = cache.meta.get(key)
            if recorded is not None and str(recorded) != str(getattr(job, key)):
                raise DecafError(f"{cache.path} records {key} {recorded!r} but belongs to job {job.job_id} "
                                 f"({key} {getattr(job, key)!r}); the cache folder mixes runs")
    if cache.frames_count != len(video.frames):
        raise DecafError(f"{cache.path} was made for {cache.frames_count} frames but {video.folder} now holds "
                         f"{len(video.frames)}; the video changed since stage 1 — rerun it with --overwrite")
    check_against_frames(cache, video.key_frame_indices, video.frame0_size)
    return cache


def run_mask_job(cache_path: str | Path, video: VideoFrames, settings: RunSettings, *,
                 attn_mask_dir: str | Path | None = None, sam_mask_dir: str | Path | None = None,
                 sam: SamPrompting | None = None, job: Job | None = None) -> JobOutcome:
    """Stage 2 on one job: Φ from the cache (§6), then coarse masks (§7) and/or SAM2 masks (§8).

    ``attn_mask_dir`` / ``sam_mask_dir`` are the expression folders to write (None skips that kind); each is
    written atomically. SAM2 reuses the image features its predictor holds for this video (SPEC §8.10).
    """
    if sam_mask_dir is not None and sam is None:
        raise ValueError("SAM masks need a loaded predictor (sam=SamPrompting(...))")
    cache = load_job_cache(cache_path, video, settings, job)
    phi = fuse_cache(cache, no_background=settings.no_background, fusion=settings.fusion)
    keys = cache.key_frame_indices
    names = video.names
    all_zero = not bool(phi.max() > 0)
    outcome = JobOutcome(f"{cache.family}, Φ {tuple(phi.shape)}", family=cache.family)
    if attn_mask_dir is not None:
        masks = coarse_masks(phi, video.frame0_size)
        write_mask_folder(attn_mask_dir, [names[k] for k in keys], masks)
        outcome.summary += f", {len(masks)} coarse masks"
        if all_zero:
            outcome.degenerate.append(f"{ATTN_MASK}: Φ is all zero; wrote empty coarse masks")
    if sam_mask_dir is not None:
        from model.sam.prompting import sam2_masks

        result = sam2_masks(sam.predictor, phi, video.frames, keys, point_threshold=sam.point_threshold,
                            final_score_threshold=sam.final_score_threshold,
                            batch_size=sam.batch_size, progress=sam.progress)
        expected_shape = (len(video.frames), *video.frame0_size)
        if tuple(result.masks.shape) != expected_shape:
            raise RuntimeError(f"SAM2 returned masks of shape {tuple(result.masks.shape)}, expected {expected_shape}")
        write_mask_folder(sam_mask_dir, names, result.masks)
        outcome.summary += (f", {len(result.masks)} SAM masks ({result.num_candidates} candidates, "
                            f"{result.num_tracklets} tracklets, {len(result.selected)} selected, "
                            f"{result.encoder_calls} encoder calls)")
        if result.degenerate:
            outcome.degenerate.append(f"{SAM_MASK}: {result.degenerate}; wrote empty masks")
        elif not result.masks.any():
            outcome.notes.append(f"{SAM_MASK}: SAM2 returned an empty mask on every frame")
    return outcome


def run_keypoint_job(cache_path: str | Path, video: VideoFrames, settings: RunSettings, output_file: str | Path,
                     job: Job | None = None) -> JobOutcome:
    """The keypoint branch on one job: Φ (§6) → top-100 cells (§9.1) → ``keypoints.pt`` (§9.2)."""
    cache = load_job_cache(cache_path, video, settings, job)
    phi = fuse_cache(cache, no_background=settings.no_background, fusion=settings.fusion)
    keypoints = extract_keypoints(phi, cache.key_frame_indices)
    save_keypoints(output_file, keypoints)
    outcome = JobOutcome(f"{cache.family}, {len(keypoints)} keypoints", family=cache.family)
    if not bool(phi.max() > 0):
        outcome.degenerate.append(f"{KEYPOINT}: Φ is all zero; the keypoints carry no information")
    return outcome


# ------------------------------------------------------------------------------------------------- the run loop
def count_pngs(folder: Path) -> int:
    return sum(1 for path in folder.iterdir() if path.suffix == ".png" and path.is_file())


def mask_folder_finished(folder: Path, expected: int) -> bool:
    """An expression folder is finished if it exists (atomic, §12.6) and holds the expected PNG count (§10.9)."""
    if not folder.is_dir():
        return False
    found = count_pngs(folder)
    if found != expected:
        log.warning("%s holds %d PNGs, expected %d; recomputing it", folder, found, expected)
        return False
    return True


def _shard(args: argparse.Namespace, skipped: list[tuple[str, str]]) -> tuple[list[Job], int, int]:
    """This process's shard of the full job list; videos without a frame folder are appended to ``skipped``."""
    subset_num, subset_idx = shard_from_env(args.subset_num, args.subset_idx)
    jobs = shard_jobs(list_jobs(args.dataset, args.data_root, args.testset, skipped=skipped), subset_num, subset_idx)
    return jobs, subset_num, subset_idx


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load_sam(args: argparse.Namespace, device: str) -> tuple[SamPrompting, bool]:
    """Load the SAM2 predictor before any job starts (a missing checkpoint is one line, SPEC §8.1) and report
    whether the ``_C`` extension loads (logged by the loader, recorded in the manifest)."""
    from model.sam.prompting import load_sam2_predictor, sam2_extension_loaded

    predictor = load_sam2_predictor(args.vision_pretrained_config, args.vision_pretrained, device,
                                    hydra_overrides=tuple(args.sam2_overrides))
    return (SamPrompting(predictor, args.point_threshold, args.final_score_threshold, args.sam2_batch, progress=True),
            sam2_extension_loaded())


def mask_main(argv: Sequence[str] | None = None) -> int:
    """``inference_attn_mask.py`` on these arguments."""
    return run_masks(build_mask_parser().parse_args(argv))


def run_masks(args: argparse.Namespace) -> int:
    """Stage 2 on parsed ``inference_attn_mask.py`` arguments (:func:`model.parsers.build_mask_parser`)."""
    _configure_logging()
    kinds = [kind for kind, wanted in ((ATTN_MASK, args.predict_attn_mask), (SAM_MASK, args.predict_sam_mask))
             if wanted]
    if not kinds:
        raise DecafError("nothing to do: pass --predict_attn_mask and/or --predict_sam_mask")
    settings = resolve_run_settings(args)
    layout = resolve_layout(args, settings, kinds, args.point_threshold, args.final_score_threshold)
    device = args.device or default_device()
    sam, extension = load_sam(args, device) if args.predict_sam_mask else (None, None)
    for folder in layout.outputs.values():
        check_writable_folder(folder)
    skipped: list[tuple[str, str]] = []
    jobs, subset_num, subset_idx = _shard(args, skipped)
    log.info("shard %d/%d: %d jobs; caches from %s; outputs to %s", subset_idx, subset_num, len(jobs),
             layout.cache_dirs[0], ", ".join(str(p) for p in layout.outputs.values()))

    record = RunRecord(len(jobs), f"stage 2 [{args.dataset}]", args.fail_fast, skipped)
    meta_path = dataset_files(args.dataset, args.data_root, args.testset).meta
    videos = group_by_video(jobs)
    with logging_redirect_tqdm(), tqdm(total=len(videos), desc="stage 2", unit="video", dynamic_ncols=True) as bar:
        for group in videos:
            if record.stopped:
                break
            _run_mask_video(group, args, settings, layout, sam, record, meta_path)
            bar.update()
    return record.close(list(layout.outputs.values()), "attn-mask", args,
                        resolved={"layer_start": settings.layer_start, "num_layers": settings.num_layers,
                                  "device": device, "subset_num": subset_num, "subset_idx": subset_idx,
                                  "cache_folders": [str(p) for p in layout.cache_dirs],
                                  "output_folders": {k: str(v) for k, v in layout.outputs.items()}},
                        sam2_extension_loaded=extension)


def _run_mask_video(group: list[Job], args: argparse.Namespace, settings: RunSettings, layout: Layout,
                    sam: SamPrompting | None, record: RunRecord, meta_path: Path) -> None:
    """All jobs of one video: skip the finished ones, share the frames and the SAM2 features among the rest."""
    try:
        frames = list_frames(group[0].frames_dir)
    except Exception as exc:
        for job in group:
            record.fail(job, exc)
        return
    first = group[0]
    mismatch = (frame_mismatch(first.video_key, first.meta_frames, frames, first.frames_dir, meta_path)
                if first.meta_frames else None)
    if mismatch:  # the reference ran such videos too (SPEC §9.4); the evaluators will miss the PNGs
        record.warn(f"{mismatch}; PNGs are named after the frame files, the evaluators read the meta frames")
    expected = {ATTN_MASK: min(len(frames), settings.num_input_frames), SAM_MASK: len(frames)}
    runner = JobRunner(lambda kind, folder: mask_folder_finished(folder, expected[kind]), overwrite=args.overwrite)
    scan = runner.scan((job, {kind: root / job.video_key / job.exp_id for kind, root in layout.outputs.items()})
                       for job in group)
    scan.report(record)
    if not scan.pending:
        return
    try:
        video = VideoFrames.read(group[0].frames_dir, settings.num_input_frames, frames)
        if any(SAM_MASK in missing for _, missing in scan.pending):
            sam.predictor.set_video(video.frames)  # the expressions of this video share its image features
    except Exception as exc:
        for job, _ in scan.pending:
            record.fail(job, exc)
        return
    for job, missing in scan.pending:
        if record.stopped:
            return
        runner.run(job, missing, lambda todo, job=job: run_mask_job(
            layout.cache_path(job.vid_name, job.exp_id), video, settings, attn_mask_dir=todo.get(ATTN_MASK),
            sam_mask_dir=todo.get(SAM_MASK), sam=sam, job=job), record)


def keypoint_main(argv: Sequence[str] | None = None) -> int:
    """``inference_keypoints.py`` on these arguments."""
    return run_keypoints(build_keypoint_parser().parse_args(argv))


def run_keypoints(args: argparse.Namespace) -> int:
    """Keypoints on parsed ``inference_keypoints.py`` arguments (:func:`model.parsers.build_keypoint_parser`)."""
    _configure_logging()
    settings = resolve_run_settings(args)
    layout = resolve_layout(args, settings, [KEYPOINT])
    out_root = check_writable_folder(layout.outputs[KEYPOINT])
    skipped: list[tuple[str, str]] = []
    jobs, subset_num, subset_idx = _shard(args, skipped)
    log.info("shard %d/%d: %d jobs; caches from %s; keypoints to %s", subset_idx, subset_num, len(jobs),
             layout.cache_dirs[0], out_root)

    record = RunRecord(len(jobs), f"keypoints [{args.dataset}]", args.fail_fast, skipped)
    runner = JobRunner(lambda _kind, output: output.is_file(), overwrite=args.overwrite)
    with logging_redirect_tqdm():
        for group in group_by_video(jobs):
            scan = runner.scan((job, {KEYPOINT: out_root / job.video_key / job.exp_id / KEYPOINTS_FILE})
                               for job in group)
            scan.report(record)
            if not scan.pending or record.stopped:
                continue
            try:
                # keypoints need the sampling and frame 0's size only, not every header (§9.1)
                video = VideoFrames.read(group[0].frames_dir, settings.num_input_frames, check_all_sizes=False)
            except Exception as exc:
                for job, _ in scan.pending:
                    record.fail(job, exc)
                continue
            for job, missing in scan.pending:
                if record.stopped:
                    break
                runner.run(job, missing, lambda todo, job=job: run_keypoint_job(
                    layout.cache_path(job.vid_name, job.exp_id), video, settings, todo[KEYPOINT], job=job), record)
    return record.close([out_root], "keypoints", args,
                        resolved={"layer_start": settings.layer_start, "num_layers": settings.num_layers,
                                  "subset_num": subset_num, "subset_idx": subset_idx,
                                  "cache_folders": [str(p) for p in layout.cache_dirs],
                                  "output_folder": str(out_root)})
