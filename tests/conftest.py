"""Shared test fixtures: real frames from ../shared/data, copied into temporary folders."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout; DECAF_SHARED_DATA points elsewhere (e.g. a copy carried to a GPU machine)
SHARED_DATA = Path(os.environ.get("DECAF_SHARED_DATA") or REPO.parent / "shared" / "data")
BEDROOM = SHARED_DATA / "videos" / "bedroom"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running the project's scripts in a subprocess.

    The repository goes first on ``PYTHONPATH`` (an existing ``PYTHONPATH`` is kept, so packages installed with
    ``--target`` still import), and torch uses one thread: several test processes share few cores, and idle
    OpenMP threads spin-wait.
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def copy_frames(dest: Path, count: int, start: int = 0, step: int = 1) -> list[Path]:
    """Copy ``count`` bedroom frames (960×540 JPEGs) into ``dest`` named 00000.jpg… and return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = BEDROOM / f"{start + i * step:05d}.jpg"
        dst = dest / f"{i:05d}.jpg"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


@pytest.fixture
def bedroom_frames(tmp_path: Path) -> list[Path]:
    """Six real frames in a temporary folder (tests must never write into ../shared)."""
    assert BEDROOM.is_dir(), f"shared data not found at {BEDROOM}; the checkout needs ../shared beside it"
    return copy_frames(tmp_path / "bedroom", 6)
