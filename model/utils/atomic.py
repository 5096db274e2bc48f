"""Atomic outputs, job claims and run manifests (SPEC §10.9, §12.6).

A file or folder is first written under a temporary sibling name that no reader will take for a result
(``.<name>.tmp-<host>-<pid>-<random>``) and then renamed into place, so a killed run never leaves a half-written
output that a resume would trust. Failures of the file system (disk full, read-only folder) become one-line
:class:`~model.utils.errors.DecafError` messages and leave nothing partial behind.

Several processes may work on one output folder (shards, or a second process of the same shard started later).
:func:`output_claim` gives one of them at a time the right to compute an output (an advisory ``flock`` on a
``.<name>.lock`` sibling, released by the kernel when its holder dies, even by SIGKILL), so no job is computed
twice; the holder removes temporary siblings that killed runs left behind (:func:`remove_stale_temporaries`).
The guarantees are summarised in ``docs/reliability.md``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

from model.utils.errors import DecafError

log = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"
LOCK_SUFFIX = ".lock"
#: this machine in temporary names: only its own dead processes' leftovers are ever removed (shared file systems)
HOST_TAG = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:32] or "host"


def _tmp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARKER}{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(path: Path) -> bool:
    """True for the temporary siblings this module creates (never results)."""
    return path.name.startswith(".") and TMP_MARKER in path.name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike) -> int:
    """Remove the temporary siblings of ``final`` left by dead processes of this machine; return their number.

    A sibling is removed only if its name carries this host and a pid that no longer runs, so writes in progress
    (of this or any other machine sharing the folder) are never touched. Leftovers of other machines stay; they
    are dot-files that no stage or evaluator counts as results.
    """
    final = Path(final)
    prefix = f".{final.name}{TMP_MARKER}"
    removed = 0
    try:
        entries = [entry for entry in os.scandir(final.parent) if entry.name.startswith(prefix)]
    except OSError:
        return 0
    for entry in entries:
        host, _, pid = entry.name[len(prefix):].rpartition("-")[0].rpartition("-")  # <host>-<pid>-<random>
        if host != HOST_TAG or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed += 1
    if removed:
        log.info("removed %d temporary leftover(s) of killed runs beside %s", removed, final)
    return removed


#: folders already warned about (one warning each, not one per job)
_folders_without_locks: set[Path] = set()


def _take_lock(lock: Path) -> tuple[bool, int | None]:
    """``(claimed, fd)``: an exclusive ``flock`` on ``lock`` (fd kept open while held), or ``(False, None)`` when a
    live process holds it, or ``(True, None)`` on a file system without locks."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)  # again: a releasing claim may remove an empty folder
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DecafError(f"cannot create {lock}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False, None
        except OSError as exc:  # ENOLCK / EOPNOTSUPP
            os.close(fd)
            if lock.parent not in _folders_without_locks:
                log.warning("%s: file locks are not supported (%s); concurrent processes may compute a job twice "
                            "(outputs stay consistent)", lock.parent, exc.strerror or exc)
                _folders_without_locks.add(lock.parent)
            return True, None
        # a releasing holder unlinks the lock file: a lock on an unlinked inode claims nothing, so retry
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return True, fd
        os.close(fd)


@contextlib.contextmanager
def output_claim(final: str | os.PathLike) -> Iterator[bool]:
    """Claim the right to compute ``final``; yields False when another live process holds the claim.

    The claim is an exclusive ``flock`` on ``.<name>.lock`` beside ``final``. The kernel drops it when its holder
    exits or is killed, so a claim never outlives its process; where the file system supports ``flock`` across
    machines (NFS v4, Lustre, GPFS) it holds across them too. The holder must check again whether ``final`` is
    finished (another process may have completed it before the claim was taken). Taking the claim removes the
    temporary leftovers of killed runs. Without file locks every caller gets the claim (one warning) and atomic
    renames alone keep the outputs consistent. Folders created for the lock and still empty afterwards (the job
    failed) are removed again.
    """
    final = Path(final)
    lock = final.with_name(f".{final.name}{LOCK_SUFFIX}")
    created = [folder for folder in (lock.parent, *lock.parent.parents) if not folder.exists()]  # deepest first
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DecafError(f"cannot create output folder {lock.parent}: {exc.strerror or exc}") from exc
    claimed, fd = _take_lock(lock)
    if claimed:
        remove_stale_temporaries(final)
    try:
        yield claimed
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)
        for folder in created:
            try:
                folder.rmdir()  # only if empty: another writer's lock or output keeps it
            except OSError:
                break


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and prove a file can be created in it; a one-line error otherwise (before any job runs)."""
    folder = Path(folder)
    probe = _tmp_sibling(folder / ".write-probe")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DecafError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc
    return folder


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
        _rename_into_place(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DecafError(f"cannot write {final}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Rename the filled folder ``tmp`` to ``final``, moving aside whatever stands there (also one that another
    process renamed into place meanwhile): ``final`` is always either absent or complete."""
    replaced = []
    while True:
        try:
            os.replace(tmp, final)  # succeeds when final is absent (or an empty folder)
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = _tmp_sibling(final)
        try:
            os.replace(final, old)
        except FileNotFoundError:  # moved away by another writer in between: try again
            continue
        replaced.append(old)
    for old in replaced:
        shutil.rmtree(old, ignore_errors=True)


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
