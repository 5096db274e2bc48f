"""Shared test fixtures: real frames kept in ``tests/data`` (see its README), copied into temporary folders."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in two worker processes (pyproject's addopts) on CI's two cores: one torch thread each, set
    # before any test module imports torch, instead of two per worker contending for the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
#: the test data lives in the repository, so a fresh clone tests with nothing beside it
DATA = REPO / "tests" / "data"
#: 40 real 960×540 frames, ``00000.jpg`` … ``00039.jpg``
BEDROOM = DATA / "bedroom"
CLIP_LENGTH = 40
#: 12 real 1280×720 frames at 29.97 fps
DOG_MP4 = DATA / "dog.mp4"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running the project's scripts in a subprocess.

    The repository goes first on ``PYTHONPATH`` (an existing ``PYTHONPATH`` is kept, so packages installed with
    ``--target`` still import), and torch uses one thread: several test processes share few cores, and idle
    OpenMP threads spin-wait.
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def frame_path(index: int) -> Path:
    """Frame ``index`` of the 40-frame test clip; indices wrap around, so a test may ask for more frames."""
    return BEDROOM / f"{index % CLIP_LENGTH:05d}.jpg"


def copy_frames(dest: Path, count: int, start: int = 0, step: int = 1) -> list[Path]:
    """Copy ``count`` bedroom frames (960×540 JPEGs; clip frames ``start``, ``start + step``, … wrapping at 40) into
    ``dest`` named 00000.jpg… and return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = frame_path(start + i * step)
        dst = dest / f"{i:05d}.jpg"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


@pytest.fixture
def bedroom_frames(tmp_path: Path) -> list[Path]:
    """Six real frames in a temporary folder (tests never write into tests/data)."""
    return copy_frames(tmp_path / "bedroom", 6)
