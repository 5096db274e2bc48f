"""Server-submission zips of Ref-YouTube-VOS and MeViS predictions (SPEC §11.10).

The layout is chosen by the dataset, never from a path substring (§14 #37):
* ``ytvos``: ``Annotations/<video>/<exp_id>/<frame>.png`` (ReferFormer convention);
* ``mevis``: ``<video>/<exp_id>/<frame>.png`` at the root of the zip (MeViS's sample submission).
Only files are stored, so empty folders vanish.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from model.utils.atomic import atomic_write, is_temporary
from model.utils.errors import DecafError

log = logging.getLogger(__name__)

ZIP_PREFIX = {"ytvos": "Annotations/", "mevis": ""}


def prediction_pngs(pred_dir: Path) -> list[Path]:
    """``<video>/<exp_id>/<frame>.png`` files under ``pred_dir``, sorted; other files are skipped with a warning."""
    pngs, skipped = [], 0
    for path in sorted(pred_dir.rglob("*.png")):
        rel = path.relative_to(pred_dir)
        if any(is_temporary(Path(part)) for part in rel.parts):
            continue  # an unfinished atomic write of a still-running job
        if len(rel.parts) == 3 and path.is_file():
            pngs.append(path)
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d PNG(s) not at <video>/<exp_id>/<frame>.png", pred_dir, skipped)
    return pngs


def make_submission_zip(pred_dir: str | Path, out_zip: str | Path, dataset: str) -> dict[str, int]:
    """Write the submission zip atomically; returns the counts of videos, expressions and files."""
    if dataset not in ZIP_PREFIX:
        raise DecafError(f"--dataset {dataset!r} has no server layout; choose one of {', '.join(ZIP_PREFIX)}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DecafError(f"prediction folder not found: {pred_dir}")
    pngs = prediction_pngs(pred_dir)
    if not pngs:
        raise DecafError(f"no <video>/<exp_id>/<frame>.png files under {pred_dir}")
    prefix = ZIP_PREFIX[dataset]

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in pngs:
                archive.write(path, prefix + path.relative_to(pred_dir).as_posix())

    atomic_write(out_zip, write)
    rels = [path.relative_to(pred_dir).parts for path in pngs]
    return {"videos": len({parts[0] for parts in rels}), "expressions": len({parts[:2] for parts in rels}),
            "files": len(pngs)}
