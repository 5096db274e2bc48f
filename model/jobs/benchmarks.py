"""Benchmark files, job lists and sharding (SPEC §10.1, §10.9).

Everything here reads the on-disk layout of SPEC §10.1 under ``--data_root`` (see ``datasets/README.md``): the meta
files name the jobs (one per expression), the frame folders are checked against them, and the job list is split into
shards. Ground truth is the evaluators' business (:mod:`evaluation.ground_truth`). Bad or missing files raise a
one-line :class:`~model.utils.errors.DecafError` that names the file.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from model.utils.errors import DecafError, SettingError
from model.utils.video import frame_name, list_frames

log = logging.getLogger(__name__)

DATASETS = ("davis", "revos", "reasonvos", "mevis", "ytvos")
DATA_ROOT_ENV = "DECAF_DATA_ROOT"
DEFAULT_DATA_ROOT = "datasets/RVOSJoint"
#: Ref-YouTube-VOS valid videos left once the test videos are dropped (SPEC §10.6, ReferFormer asserts it)
YTVOS_VALID_VIDEOS = 202
YTVOS_TEST_META = "ref-youtube-vos/meta_expressions/test/meta_expressions.json"


@dataclass(frozen=True)
class Job:
    """One (video, expression) of a benchmark, in job-list order (SPEC §10.9)."""

    dataset: str
    video_key: str
    vid_name: str  # meta[key]["vid_id"] as str if present, else the key; names cache files (SPEC §12.2)
    exp_id: str
    expression: str
    frames_dir: Path
    meta_frames: tuple[str, ...] = field(default=(), compare=False, repr=False)  # meta["frames"] (SPEC §10.1)

    @property
    def job_id(self) -> str:
        """``<video key>/<exp_id>``, for logs and manifests."""
        return f"{self.video_key}/{self.exp_id}"


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one benchmark split (SPEC §10.1); ``mask``/``foreground`` are None where no GT exists."""

    meta: Path
    frames_root: Path
    mask: Path | None
    foreground: Path | None


def default_data_root() -> Path:
    """``$DECAF_DATA_ROOT`` if set, else ``datasets/RVOSJoint`` relative to the working directory (SPEC §10.1)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def dataset_files(dataset: str, data_root: str | Path | None = None, testset: bool = False) -> DatasetFiles:
    """Meta, frame and GT paths of ``dataset`` under ``data_root`` (SPEC §10.1 table)."""
    if dataset not in DATASETS:
        raise DecafError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if testset and dataset != "mevis":
        raise SettingError("testset", f"selects MeViS 'valid' and does not apply to dataset {dataset!r}")
    root = Path(data_root) if data_root is not None else default_data_root()
    if dataset == "davis":
        return DatasetFiles(root / "davis17/meta_expressions/valid/meta_expressions.json",
                            root / "davis17/valid/JPEGImages", root / "davis17/valid/mask_dict.pkl", None)
    if dataset == "revos":
        return DatasetFiles(root / "ReVOS/meta_expressions_valid_.json", root / "ReVOS/JPEGImages",
                            root / "ReVOS/mask_dict.json", root / "ReVOS/mask_dict_foreground.json")
    if dataset == "reasonvos":
        return DatasetFiles(root / "ReasonVOS/meta_expressions_v2.json", root / "ReasonVOS/JPEGImages",
                            root / "ReasonVOS/mask_dict_v2.pkl", None)
    if dataset == "mevis":
        split = root / "mevis" / ("valid" if testset else "valid_u")
        # MeViS 'valid' is scored on the server only, so it ships no mask dict (SPEC §10.5)
        return DatasetFiles(split / "meta_expressions.json", split / "JPEGImages",
                            None if testset else split / "mask_dict.json", None)
    return DatasetFiles(root / "ref-youtube-vos/meta_expressions/valid/meta_expressions.json",
                        root / "ref-youtube-vos/valid/JPEGImages", None, None)


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the benchmark layout; ``what`` names it in the one-line error."""
    if not path.is_file():
        raise DecafError(f"{what} not found: {path} (see datasets/README.md for the expected layout)")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DecafError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DecafError(f"cannot read {what} {path}: {exc}") from exc


def load_meta(path: str | Path) -> dict:
    """``json["videos"]`` of a meta-expressions file (SPEC §10.1)."""
    path = Path(path)
    data = read_json(path, "meta file")
    if not isinstance(data, dict) or "videos" not in data:
        raise DecafError(f"meta file {path} has no 'videos' key; expected {{\"videos\": {{video: {{...}}}}}}")
    videos = data["videos"]
    if not isinstance(videos, dict):
        raise DecafError(f"meta file {path}: 'videos' must map video keys to entries, got {type(videos).__name__}")
    return videos



def _video_entry(meta: Mapping, video_key: str, meta_path: Path | str) -> Mapping:
    entry = meta[video_key]
    if not isinstance(entry, dict) or not isinstance(entry.get("expressions"), dict):
        raise DecafError(f"meta file {meta_path}: video {video_key!r} has no 'expressions' dict")
    if not isinstance(entry.get("frames"), list):
        raise DecafError(f"meta file {meta_path}: video {video_key!r} has no 'frames' list")
    return entry


def jobs_from_meta(dataset: str, meta: Mapping, frames_root: Path, meta_path: Path | str = "meta") -> list[Job]:
    """Every (video, expression) of ``meta`` in meta order, without looking at the disk (evaluators score all)."""
    jobs = []
    for video_key in meta:
        entry = _video_entry(meta, video_key, meta_path)
        vid_name = str(entry["vid_id"]) if "vid_id" in entry else video_key
        meta_frames = tuple(str(name) for name in entry["frames"])
        for exp_id, exp in entry["expressions"].items():
            if not isinstance(exp, dict) or not isinstance(exp.get("exp"), str):
                raise DecafError(f"meta file {meta_path}: expression {video_key}/{exp_id} has no 'exp' text")
            jobs.append(Job(dataset, video_key, vid_name, str(exp_id), exp["exp"], frames_root / video_key,
                            meta_frames))
    return jobs


def _drop_ytvos_test_videos(meta: dict, data_root: Path) -> dict:
    """Remove the test videos that the competition's valid meta also lists (SPEC §10.6, §14 #32)."""
    test_meta_path = data_root / YTVOS_TEST_META
    if test_meta_path.is_file():
        test_videos = set(load_meta(test_meta_path))
        meta = {key: entry for key, entry in meta.items() if key not in test_videos}
    else:
        log.warning("%s not found; the test videos of the valid meta cannot be dropped", test_meta_path)
    if len(meta) != YTVOS_VALID_VIDEOS:
        log.warning("Ref-YouTube-VOS: %d videos remain, expected %d valid videos", len(meta), YTVOS_VALID_VIDEOS)
    return meta


def frame_mismatch(video_key: str, meta_frames: Sequence[str], frames: Sequence[Path], frames_dir: Path,
                   meta_path: Path | str) -> str | None:
    """How the meta frame names differ from the frame files' names (SPEC §2.2, §10.1), or None if they agree."""
    on_disk = [frame_name(p) for p in frames]
    if list(meta_frames) == on_disk:
        return None
    first = next((i for i, (a, b) in enumerate(zip(meta_frames, on_disk)) if a != b),
                 min(len(meta_frames), len(on_disk)))
    meta_name = meta_frames[first] if first < len(meta_frames) else "<end>"
    disk_name = on_disk[first] if first < len(on_disk) else "<end>"
    return (f"video {video_key}: meta lists {len(meta_frames)} frames but {frames_dir} holds {len(on_disk)} .jpg "
            f"frames; first difference at position {first}: meta {meta_name!r} vs folder {disk_name!r} (meta file "
            f"{meta_path})")


def check_meta_frames(video_key: str, meta_frames: Sequence[str], frames_dir: Path,
                      meta_path: Path | str = "meta") -> None:
    """Meta frame names must equal the frame names of SPEC §2.2, in order (SPEC §10.1)."""
    problem = frame_mismatch(video_key, meta_frames, list_frames(frames_dir), frames_dir, meta_path)
    if problem:
        raise DecafError(problem)


def list_jobs(dataset: str, data_root: str | Path | None = None, testset: bool = False, *,
              check_frames: bool = False, skipped: list[tuple[str, str]] | None = None) -> list[Job]:
    """The full job list of SPEC §10.9: videos in meta order, then expression ids in meta order.

    Ref-YouTube-VOS test videos are dropped first (§10.6). A video whose frame folder is missing is skipped with a
    warning, and ``(video key, reason)`` is appended to ``skipped`` when given (for the run manifest). With
    ``check_frames`` the meta frame names are compared with the frame files (§10.1, §2.2).
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    files = dataset_files(dataset, root, testset)
    meta = load_meta(files.meta)
    if dataset == "ytvos":
        meta = _drop_ytvos_test_videos(meta, root)
    missing = [key for key in meta if not (files.frames_root / key).is_dir()]
    for key in missing:
        reason = f"frame folder {files.frames_root / key} not found"
        log.warning("video %s: %s; skipping its expressions", key, reason)
        if skipped is not None:
            skipped.append((key, reason))
    absent = set(missing)
    present = {key: entry for key, entry in meta.items() if key not in absent}
    jobs = jobs_from_meta(dataset, present, files.frames_root, files.meta)
    if check_frames:
        for key in present:
            check_meta_frames(key, _video_entry(present, key, files.meta)["frames"], files.frames_root / key,
                              files.meta)
    return jobs


def shard_jobs(jobs: list[Job], subset_num: int, subset_idx: int) -> list[Job]:
    """The jobs of shard ``subset_idx``: video i of the FULL list goes to shard ``i % subset_num`` with all its
    expressions (SPEC §10.9, §14 #30), so a video's per-video work (its visual prefixes, §5.8f; its SAM2 features,
    §8.10) is done by one process.

    Videos are numbered in the order they first appear in ``jobs`` (meta order). Finished jobs must be skipped only
    after sharding, so that every shard sees the same list.
    """
    if not isinstance(subset_num, int) or subset_num < 1:
        raise SettingError("subset_num", f"must be a positive integer, got {subset_num!r}")
    if not isinstance(subset_idx, int) or not 0 <= subset_idx < subset_num:
        raise SettingError("subset_idx", f"must be in [0, {subset_num - 1}] for subset_num {subset_num}, "
                                         f"got {subset_idx!r}")
    video_index: dict[tuple[str, str], int] = {}
    for job in jobs:
        video_index.setdefault((job.dataset, job.video_key), len(video_index))
    return [job for job in jobs if video_index[(job.dataset, job.video_key)] % subset_num == subset_idx]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise DecafError(f"environment variable {name}={value!r} is not an integer") from exc


def shard_from_env(subset_num: int, subset_idx: int) -> tuple[int, int]:
    """Shard from torchrun (``WORLD_SIZE``/``RANK``) or Slurm (``SLURM_NTASKS``/``SLURM_PROCID``).

    Only when the flags are left at their defaults (1, 0) and the launcher started more than one task; explicit
    flags always win.
    """
    if (subset_num, subset_idx) != (1, 0):
        return subset_num, subset_idx
    for size_var, rank_var in (("WORLD_SIZE", "RANK"), ("SLURM_NTASKS", "SLURM_PROCID")):
        size, rank = _env_int(size_var), _env_int(rank_var)
        if size is not None and rank is not None and size > 1:
            if not 0 <= rank < size:
                raise DecafError(f"{rank_var}={rank} is outside [0, {size - 1}] given by {size_var}")
            return size, rank
    return subset_num, subset_idx


def group_by_video(jobs: Iterable[Job]) -> list[list[Job]]:
    """Consecutive jobs of the same video, order preserved (stage 2 shares per-video work)."""
    groups: list[list[Job]] = []
    for job in jobs:
        if groups and groups[-1][0].video_key == job.video_key:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups
