"""The ReasonVOS reformat of SPEC §10.4: ``meta_expressions_v2.json`` and ``mask_dict_v2.pkl``.

VideoLISA ships ReasonVOS with a *list* of expressions per video whose ``exp_id`` is unique only per
(video, object). The reformat turns it into the dict layout of the other benchmarks: every expression is kept and
duplicate ids are re-issued exactly as the reference did (replicated, §14 #23), and every object's masks become a
list of COCO RLEs aligned with ``meta["frames"]`` **by position**.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from model.jobs.benchmarks import load_meta
from model.utils.atomic import atomic_write_bytes, atomic_write_json
from model.utils.errors import DecafError

ORIGINAL_META = "meta_expressions.json"
NEW_META = "meta_expressions_v2.json"
NEW_MASK_DICT = "mask_dict_v2.pkl"


def anno_id(video: Mapping, vid: str, expression: Mapping) -> str:
    """``<source>_<vid>_<obj_id>``: the name of the object's annotation folder."""
    return f"{video['source']}_{vid}_{expression['obj_id']}"


def reformat_meta(videos: Mapping[str, Mapping]) -> dict[str, dict]:
    """The meta transformation of SPEC §10.4, including dict insertion order and duplicate-id reassignment:
    a later duplicate keeps the id (re-inserted at the end) and the earlier one moves to the next free id above
    the current maximum."""
    new_meta = {}
    for vid in sorted(videos):
        d: dict[str, dict] = {}
        for e in videos[vid]["expressions"]:
            key = str(e["exp_id"])
            entry = {"exp": e["exp_text"], "obj_id": [e["obj_id"]], "anno_id": [anno_id(videos[vid], vid, e)],
                     "is_sent": e["is_sent"]}
            popped = [d.pop(key)] if key in d else []
            d[key] = entry
            if popped:
                n = max(int(x) for x in d) + 1
                while popped:
                    if str(n) not in d:
                        d[str(n)] = popped.pop(0)
                    n += 1
        new_meta[vid] = {"source": videos[vid]["source"], "frames": videos[vid]["frames"], "expressions": d}
    return new_meta


def _check_original(videos: Mapping, meta_path: Path) -> None:
    for vid, video in videos.items():
        if not isinstance(video, dict) or not {"source", "frames", "expressions"} <= video.keys() \
                or not isinstance(video["expressions"], list):
            raise DecafError(f"meta file {meta_path}: video {vid!r} needs 'source', 'frames' and an "
                             f"'expressions' list (the original VideoLISA layout)")
        for e in video["expressions"]:
            missing = {"exp_id", "obj_id", "exp_text", "is_sent"} - set(e)
            if missing:
                raise DecafError(f"meta file {meta_path}: an expression of video {vid!r} lacks "
                                 f"{', '.join(sorted(missing))}")
            if not str(e["exp_id"]).lstrip("-").isdigit():
                raise DecafError(f"meta file {meta_path}: video {vid!r} has a non-integer exp_id {e['exp_id']!r}")


def encode_mask_file(path: Path) -> dict:
    """``np.array(Image.open(f)) > 0`` as uint8, encoded as a COCO RLE (Fortran order, ``counts`` bytes)."""
    from pycocotools import mask as mask_utils

    try:
        with Image.open(path) as image:
            array = np.array(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DecafError(f"cannot read mask {path}: {exc}") from exc
    if array.ndim != 2:
        raise DecafError(f"mask {path} has {array.shape[2]} channels; ReasonVOS masks must be single-channel")
    return mask_utils.encode(np.asfortranarray((array > 0).astype(np.uint8)))


def build_mask_dict(annotations_root: Path, anno_ids: list[str]) -> dict[str, list[dict]]:
    """``{anno_id: [RLE per mask file]}`` over sorted unique anno_ids; files in ``sorted(os.listdir)`` order."""
    mask_dict = {}
    for anno in tqdm(sorted(set(anno_ids)), desc="encode masks", unit="object"):
        folder = annotations_root / anno
        if not folder.is_dir():
            raise DecafError(f"annotation folder not found: {folder}")
        mask_dict[anno] = [encode_mask_file(folder / name) for name in sorted(os.listdir(folder))]
    return mask_dict


def count_mismatches(new_meta: Mapping[str, Mapping], jpeg_root: Path, annotations_root: Path) -> list[str]:
    """One line per video where #JPEGs, #mask files of an object and ``len(frames)`` disagree (SPEC §10.4)."""
    lines = []
    for vid, video in new_meta.items():
        folder = jpeg_root / vid
        jpegs = sum(1 for p in folder.iterdir() if p.name.endswith(".jpg") and p.is_file()) \
            if folder.is_dir() else 0
        objects = {anno: len(os.listdir(annotations_root / anno))
                   for exp in video["expressions"].values() for anno in exp["anno_id"]}
        if any(n != jpegs for n in objects.values()) or jpegs != len(video["frames"]):
            masks = ", ".join(f"{anno}: {n}" for anno, n in objects.items())
            lines.append(f"video {vid}: {jpegs} JPEGs, {len(video['frames'])} meta frames, mask files {masks}")
    return lines


def reformat(data_root: str | Path) -> dict[str, int | list[str]]:
    """Run the whole reformat under ``<data_root>/ReasonVOS``; prints the counts and returns a summary."""
    root = Path(data_root) / "ReasonVOS"
    meta_path = root / ORIGINAL_META
    videos = load_meta(meta_path)
    _check_original(videos, meta_path)
    new_meta = reformat_meta(videos)
    original = sum(len(v["expressions"]) for v in videos.values())
    new = sum(len(v["expressions"]) for v in new_meta.values())
    print(f"expressions: original {original}, new {new}")
    if original != new:
        raise DecafError(f"reformat of {meta_path} changed the expression count ({original} -> {new})")
    annotations_root = root / "Annotations"
    anno_ids = [anno for v in new_meta.values() for exp in v["expressions"].values() for anno in exp["anno_id"]]
    mask_dict = build_mask_dict(annotations_root, anno_ids)
    mismatches = count_mismatches(new_meta, root / "JPEGImages", annotations_root)
    for line in mismatches:
        print(f"count mismatch: {line}")
    atomic_write_json(root / NEW_META, {"videos": new_meta})
    atomic_write_bytes(root / NEW_MASK_DICT, pickle.dumps(mask_dict))
    print(f"wrote {root / NEW_META} ({len(new_meta)} videos) and {root / NEW_MASK_DICT} ({len(mask_dict)} objects)")
    return {"original": original, "new": new, "videos": len(new_meta), "objects": len(mask_dict),
            "mismatches": mismatches}
