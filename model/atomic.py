"""Atomic outputs and run manifests (SPEC §12.6).

A file or folder is first written under a temporary sibling name that no reader will take for a result
(``.<name>.tmp-<pid>-<random>``) and then renamed into place, so a killed run never leaves a half-written
output that a resume would trust. Failures of the file system (disk full, read-only folder) become one-line
:class:`~model.errors.DecafError` messages and leave nothing partial behind.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DecafError

TMP_MARKER = ".tmp-"


def _tmp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(path: Path) -> bool:
    """True for the temporary siblings this module creates (never results)."""
    return path.name.startswith(".") and TMP_MARKER in path.name


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``; nothing is left at ``path`` on failure."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DecafError(f"cannot create output folder {final.parent}: {exc.strerror or exc}") from exc
    tmp = _tmp_sibling(final)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DecafError(f"cannot write {final}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)
    return final


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced (used with ``--overwrite``). On any exception the temporary folder is
    removed and ``path`` is untouched.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(final)
        tmp.mkdir()
    except OSError as exc:
        raise DecafError(f"cannot create output folder {final}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        for child in tmp.iterdir():
            with open(child, "rb+") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            old = _tmp_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DecafError(f"cannot write {final}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


def library_versions() -> dict[str, str | None]:
    """Versions recorded in caches and manifests."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("decaf", "torch", "transformers", "sam2", "numpy", "opencv-python-headless", "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(folder: str | os.PathLike, command: str, arguments: dict[str, Any], **extra: Any) -> Path:
    """Write ``<folder>/manifest_<timestamp>.json`` (SPEC §12.6) and return its path."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    record = {
        "command": command,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items()},
        "versions": library_versions(),
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        **extra,
    }
    return atomic_write_json(Path(folder) / f"manifest_{stamp}.json", record)
