"""Ground-truth assembly for the evaluators (SPEC §10.2–§10.7): mask files, anno ids, RLE decoding.

The job lists and benchmark files come from :mod:`model.jobs.benchmarks`; this module turns an expression's anno
ids into its per-frame GT masks. Bad or missing files raise a one-line :class:`~model.utils.errors.DecafError`.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from model.jobs.benchmarks import read_json
from model.utils.errors import DecafError

def load_mask_dict(path: str | Path) -> dict:
    """A GT mask dict (``{anno_id: [RLE or None per frame]}``) or the ReVOS foreground dict; JSON or pickle
    chosen by the suffix (SPEC §10.2–§10.4)."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path, "mask file")
    elif path.suffix in (".pkl", ".pickle"):
        if not path.is_file():
            raise DecafError(f"mask file not found: {path} (see datasets/README.md for the expected layout)")
        try:
            with open(path, "rb") as handle:
                data = pickle.load(handle)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, OSError) as exc:
            raise DecafError(f"mask file {path} is not a readable pickle ({type(exc).__name__}: {exc})") from exc
    else:
        raise DecafError(f"mask file {path}: unsupported suffix {path.suffix!r}; expected .json or .pkl")
    if not isinstance(data, dict):
        raise DecafError(f"mask file {path} must hold a dict, got {type(data).__name__}")
    return data



def davis_anno_ids(meta: Mapping) -> dict[tuple[str, str], int]:
    """Ref-DAVIS17 anno_ids (SPEC §10.2, §14 #24): a running counter over videos sorted by name and, within a
    video, over expression ids sorted **as strings** ("0", "1", "10", "11", "2", …)."""
    mapping: dict[tuple[str, str], int] = {}
    counter = 0
    for video_key in sorted(meta):
        for exp_id in sorted(str(e) for e in meta[video_key]["expressions"]):
            mapping[(video_key, exp_id)] = counter
            counter += 1
    return mapping


def expression_anno_ids(dataset: str, meta: Mapping, video_key: str, exp_id: str,
                        davis_map: Mapping[tuple[str, str], int] | None) -> list:
    """The mask-dict keys whose union is the expression's GT (SPEC §10.2, §10.7)."""
    if dataset == "davis":
        if davis_map is None:
            raise ValueError("DAVIS needs the anno-id map of davis_anno_ids(meta)")
        return [davis_map[(video_key, str(exp_id))]]
    anno = meta[video_key]["expressions"][exp_id].get("anno_id", [])
    return list(anno) if isinstance(anno, (list, tuple)) else [anno]


def find_mask_key(mask_dict: Mapping, anno_id: Any) -> Any:
    """The key under which ``anno_id`` is stored: as given, as a string (JSON files) or as an int (DAVIS pkl)."""
    if anno_id in mask_dict:
        return anno_id
    if str(anno_id) in mask_dict:
        return str(anno_id)
    if isinstance(anno_id, str) and anno_id.lstrip("-").isdigit() and int(anno_id) in mask_dict:
        return int(anno_id)
    return None


def decode_rle(rle: Mapping) -> np.ndarray:
    """A COCO RLE (compressed ``counts`` as str/bytes, or uncompressed list) as a uint8 (H, W) mask.

    A decoded mask with three dimensions is summed over its last axis as uint8 (SPEC §10.3).
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(dict(rle), *rle["size"])
        with warnings.catch_warnings():
            # pycocotools' Masks.__array__ predates NumPy 2's copy keyword; the warning is harmless noise
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rle)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DecafError(f"malformed RLE ({type(exc).__name__}: {exc})") from exc
    if decoded.ndim == 3:
        decoded = decoded.sum(axis=2, dtype=np.uint8)
    return np.asarray(decoded, dtype=np.uint8)


def gt_masks(anno_ids: Sequence, mask_dict: Mapping, num_frames: int, *,
             size: tuple[int, int] | None = None, indices: Sequence[int] | None = None) -> np.ndarray:
    """The uint8 GT G of SPEC §10.7, shape (F, H, W) (or (len(indices), H, W) for the given frame positions).

    G_f is the sum of the decoded RLEs of every anno_id at meta frame f; ``None`` contributes nothing (values 0/1,
    2 where objects overlap). ``size`` is the expected (H, W): every RLE must have it, and it gives the shape when
    no RLE exists (all ``None`` or no anno_id).
    """
    positions = list(range(num_frames)) if indices is None else list(indices)
    per_anno = []
    for anno_id in anno_ids:
        key = find_mask_key(mask_dict, anno_id)
        if key is None:
            raise DecafError(f"anno_id {anno_id!r} is missing from the mask dict")
        rles = mask_dict[key]
        if not isinstance(rles, (list, tuple)) or len(rles) < num_frames:
            count = len(rles) if isinstance(rles, (list, tuple)) else "no"
            raise DecafError(f"anno_id {anno_id!r} has {count} GT entries for {num_frames} meta frames")
        per_anno.append(rles)
    for pos in positions:
        if not 0 <= pos < num_frames:
            raise DecafError(f"frame index {pos} is outside the {num_frames} meta frames")
    if size is None:
        size = next((tuple(int(v) for v in rles[pos]["size"]) for rles in per_anno for pos in positions
                     if rles[pos] is not None), None)
        if size is None:
            raise DecafError("GT has no mask in the requested frames and no size was given")
    height, width = size
    out = np.zeros((len(positions), height, width), dtype=np.uint8)
    for rles in per_anno:
        for row, pos in enumerate(positions):
            if rles[pos] is None:
                continue
            decoded = decode_rle(rles[pos])
            if decoded.shape != (height, width):
                raise DecafError(f"GT mask of frame {pos} is {decoded.shape[1]}x{decoded.shape[0]}, expected "
                                 f"{width}x{height} (the prediction/frame size)")
            out[row] += decoded
    return out
