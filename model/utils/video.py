"""Frames of one video: listing, sampling and sizes (SPEC §2.2–§2.5).

Frames are never decoded here: sizes come from image headers (§2.5). Every problem with a frame folder becomes
a :class:`~model.utils.errors.DecafError` that names the video.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.utils.errors import DecafError, SettingError

log = logging.getLogger(__name__)

FRAME_SUFFIX = ".jpg"


def list_frames(folder: str | os.PathLike) -> list[Path]:
    """The frame files of a video folder, SPEC §2.2.

    Regular files whose name ends with ``.jpg`` (case-sensitive), sorted by name in code-point order. Other
    entries are ignored with one warning per video (the reference counted them, §14 #31). No frame is an error.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DecafError(f"frame folder not found: {root}")
    frames, others = [], []
    for entry in os.scandir(root):
        if entry.name.endswith(FRAME_SUFFIX) and entry.is_file():
            frames.append(entry.name)
        else:
            others.append(entry.name)
    if others:
        log.warning("%s: ignoring %d non-frame entr%s (e.g. %s)", root, len(others),
                    "y" if len(others) == 1 else "ies", sorted(others)[0])
    if not frames:
        raise DecafError(f"no .jpg frames in {root}")
    return [root / name for name in sorted(frames)]


def frame_name(path: str | os.PathLike) -> str:
    """A frame's name: its file name without the ``.jpg`` suffix (§2.2); PNG outputs use it."""
    name = Path(path).name
    return name[: -len(FRAME_SUFFIX)] if name.endswith(FRAME_SUFFIX) else Path(name).stem


def sample_indices(num_frames: int, num_input_frames: int) -> list[int]:
    """Uniform frame sampling, SPEC §2.3: float64 linspace truncated toward zero (not rounded)."""
    if num_frames <= 0:
        raise ValueError("a video needs at least one frame")
    if num_input_frames <= 0:
        raise SettingError("num_input_frames", f"must be positive, got {num_input_frames}")
    if num_frames <= num_input_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, num_input_frames, dtype=np.float64).astype(int).tolist()


def read_frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the image header alone (§2.5); unreadable files are a :class:`DecafError`."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DecafError(f"cannot read image {path}: {exc}") from exc
    return height, width


def check_frame_sizes(frames: list[Path]) -> tuple[int, int]:
    """(H₀, W₀) of frame 0, after checking every frame has that size (SPEC §2.4, §14 #42)."""
    if not frames:
        raise DecafError("no frames given")
    size0 = read_frame_size(frames[0])
    for path in frames[1:]:
        size = read_frame_size(path)
        if size != size0:
            raise DecafError(
                f"video {frames[0].parent}: frame {path.name} is {size[1]}x{size[0]} but frame 0 is "
                f"{size0[1]}x{size0[0]}; all frames of a video must have one size")
    return size0


def verify_decodable(path: str | os.PathLike) -> None:
    """Decode one image fully (a header read does not catch a truncated JPEG); used on sampled frames."""
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DecafError(f"cannot decode image {path}: {exc}") from exc
