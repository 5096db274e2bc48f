"""The attention cache: one safetensors file per (video, expression) job (SPEC §12.2).

Stage 1 writes the four raw rollout maps (visual tokens only, fp32) and a JSON record of how they were made;
stage 2 and the keypoint branch read them. A file is written atomically and validated on every load, so a
truncated or foreign file is reported with its path instead of producing silent garbage.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from model.utils.atomic import atomic_write
from model.utils.errors import DecafError

FORMAT_VERSION = 1
METADATA_KEY = "decaf"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")
OBJECT_MAPS = ("obj_video", "obj_frame")
BACKGROUND_MAPS = ("bg_video", "bg_frame")

#: metadata entries that must agree before an existing cache is reused (§12.2)
MATCHED_SETTINGS = ("family", "checkpoint", "num_layers", "layer_start", "layer_end", "num_input_frames",
                    "prompt_versions")
#: entries inside ``settings`` that must agree as well: the resolution flags, the image-processor backend and the
#: M-RoPE rule of video passes (§3.1; a cache made before a setting was recorded lacks it, so it counts as made with
#: other settings)
MATCHED_RESOLUTION = ("attn_max_token", "attn_resize_scale", "attn_max_token_per_image", "max_patches",
                      "image_processor_backend", "mrope_positions")


@dataclass
class AttentionCache:
    """The validated content of one cache file."""

    path: Path
    obj_video: torch.Tensor
    obj_frame: torch.Tensor
    bg_video: torch.Tensor | None
    bg_frame: torch.Tensor | None
    meta: dict[str, Any]

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def key_frame_indices(self) -> list[int]:
        return list(self.meta["key_frame_indices"])

    @property
    def frame0_size(self) -> tuple[int, int]:
        height, width = self.meta["frame0_size"]
        return int(height), int(width)

    @property
    def frames_count(self) -> int:
        return int(self.meta["frames_count"])

    @property
    def has_background(self) -> bool:
        return self.bg_video is not None


def save_cache(path: str | os.PathLike, maps: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write the maps (fp32, contiguous) and ``meta`` atomically; the result is validated before the rename."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in maps.items()}
    record = {"format_version": FORMAT_VERSION, **meta}
    metadata = {METADATA_KEY: json.dumps(record, ensure_ascii=False)}

    # serialised in memory and written by Python, so a full disk raises an OSError that names the file
    data = serialize(tensors, metadata=metadata)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        load_cache(tmp)  # never rename a file that would not load

    return atomic_write(path, write)


def _fail(path: Path, reason: str) -> DecafError:
    return DecafError(f"invalid attention cache {path}: {reason} (delete it or rerun stage 1 with --overwrite)")


def load_cache(path: str | os.PathLike) -> AttentionCache:
    """Read and validate a cache file (§12.2); any failed check raises a :class:`DecafError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DecafError(f"attention cache not found: {path} (run stage 1 first, or check --attn_save_path)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several unrelated types for damaged files
        raise _fail(path, f"cannot parse the file ({exc})") from exc
    if raw_meta is None:
        raise _fail(path, f"no '{METADATA_KEY}' metadata (not a DecAF cache, or an old format)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"metadata is not JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise _fail(path, f"format_version {found!r} is not supported (expected {FORMAT_VERSION})")
    if meta.get("family") not in FAMILIES:
        raise _fail(path, f"unknown model family {meta.get('family')!r}")
    for key in ("key_frame_indices", "frames_count", "frame0_size", "num_input_frames"):
        if key not in meta:
            raise _fail(path, f"metadata lacks '{key}'")

    has_bg = any(name in tensors for name in BACKGROUND_MAPS)
    required = OBJECT_MAPS + (BACKGROUND_MAPS if has_bg else ())
    for name in required:
        if name not in tensors:
            raise _fail(path, f"tensor '{name}' is missing")
        t = tensors[name]
        if t.dim() != 3 or t.dtype != torch.float32:
            raise _fail(path, f"tensor '{name}' must be 3-D float32, got {tuple(t.shape)} {t.dtype}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise _fail(path, f"tensor '{name}' has non-finite or negative values")
    if has_bg:
        for obj, bg in zip(OBJECT_MAPS, BACKGROUND_MAPS):
            if tensors[obj].shape != tensors[bg].shape:
                raise _fail(path, f"'{obj}' {tuple(tensors[obj].shape)} and '{bg}' {tuple(tensors[bg].shape)} differ")

    indices = meta["key_frame_indices"]
    frames_count = meta["frames_count"]
    T = len(indices)
    if tensors["obj_frame"].shape[0] != T:
        raise _fail(path, f"frame maps hold {tensors['obj_frame'].shape[0]} frames but {T} key frames are recorded")
    t_video = tensors["obj_video"].shape[0]
    if t_video not in (T, math.ceil(T / 2)):
        raise _fail(path, f"video map has {t_video} time slots; expected {T} or {math.ceil(T / 2)}")
    if (T == 0 or indices[0] != 0 or any(b <= a for a, b in zip(indices, indices[1:]))
            or indices[-1] >= frames_count):
        raise _fail(path, f"key_frame_indices must start at 0, increase strictly and lie below {frames_count}")
    return AttentionCache(path=path, obj_video=tensors["obj_video"], obj_frame=tensors["obj_frame"],
                          bg_video=tensors.get("bg_video"), bg_frame=tensors.get("bg_frame"), meta=meta)


def setting_mismatches(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Names of the recorded settings that differ from ``expected`` (same structure as the metadata)."""
    diffs = [key for key in MATCHED_SETTINGS if key in expected and meta.get(key) != expected[key]]
    recorded, wanted = meta.get("settings", {}), expected.get("settings", {})
    diffs += [f"settings.{key}" for key in MATCHED_RESOLUTION
              if key in wanted and recorded.get(key) != wanted[key]]
    return diffs


def check_against_frames(cache: AttentionCache, key_frame_indices: list[int], frame0_size: tuple[int, int]) -> None:
    """Stage 2: the cache must describe the frame folder as it is now (§12.2)."""
    if cache.key_frame_indices != list(key_frame_indices):
        raise DecafError(f"{cache.path}: key frames {cache.key_frame_indices} differ from those of the frame folder "
                         f"now ({list(key_frame_indices)}); the video changed since stage 1 — rerun it with --overwrite")
    if cache.frame0_size != tuple(frame0_size):
        raise DecafError(f"{cache.path}: frame size {cache.frame0_size} differs from the frame folder's "
                         f"{tuple(frame0_size)}; rerun stage 1 with --overwrite")
