"""The attention cache: one safetensors file per (video, expression) job (SPEC §12.2).

Stage 1 writes the four raw rollout maps (visual tokens only, fp32) and a JSON record of how they were made;
stage 2 and the keypoint branch read them. A file is written atomically and validated on every load, so a
truncated or foreign file is reported with its path instead of producing silent garbage.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
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



def _key(doc: str, *, matched: bool = False, default: Any = None) -> Any:
    """A metadata key with its documentation; ``matched`` keys must agree before a cache is reused (§12.2)."""
    return field(default=default, metadata={"doc": doc, "matched": matched})


def _required(doc: str, *, matched: bool = False) -> Any:
    return field(metadata={"doc": doc, "matched": matched})


@dataclass(kw_only=True)
class CacheMeta:
    """The JSON record of one cache file (SPEC §12.2): how its maps were made and for which job.

    Stage 1 writes it (:func:`save_cache`), stage 2 and the keypoint branch read it back
    (:attr:`AttentionCache.record`), and both compare its matched keys with the run's own (:func:`expected_meta`,
    :func:`setting_mismatches`). The field order is the key order of the file; the five keys without a default are
    the ones every loader needs. Keys a newer DecAF adds are ignored on reading.
    """

    family: str = _required("MLLM family (qwen2_vl, qwen2_5_vl, qwen3_vl, llava_onevision, internvl); stage 2 "
                            "takes it from here, never from a path (§14 #27)", matched=True)
    checkpoint: str | None = _key("the --version checkpoint folder, as given", matched=True)
    checkpoint_revision: str | None = _key("the checkpoint's commit hash when known, else null")
    num_layers: int | None = _key("LLM depth read from the checkpoint's config.json", matched=True)
    layer_start: int | None = _key("first rolled-out layer, resolved (§5.1)", matched=True)
    layer_end: int | None = _key("end of the rolled-out layers, resolved and exclusive (§5.1)", matched=True)
    num_input_frames: int = _required("N, the frames sampled per video (§2.3)", matched=True)
    frames_count: int = _required("F, the frames of the video folder when stage 1 ran (§2.2)")
    key_frame_indices: list[int] = _required("the T sampled frame indices: strictly increasing, from 0, below F "
                                             "(§2.3)")
    frame0_size: list[int] = _required("[H₀, W₀] of frame 0 (§2.4)")
    video_grid: list[int] | None = _key("[t_v, h_v, w_v] of the video maps")
    frame_grid: list[int] | None = _key("[T, h_f, w_f] of the frame maps")
    tiling: list[int] | None = _key("[rows, cols] of the InternVL tiling, null for other families (§3.3)")
    prompt_versions: dict[str, int] | None = _key("{obj, bg, choice}: the prompt versions of §4", matched=True)
    prompts: dict[str, str | None] | None = _key("the filled prompt texts {obj, choice, bg}; bg null when the "
                                                 "background passes were skipped (§4)")
    texts: dict[str, Any] | None = _key("decoded answers: obj_cls_video, obj_cls_frame (T), obj_name, "
                                        "bg_caption_video and bg_caption_frame (null unless decoded)")
    settings: dict[str, Any] | None = _key("resolution, precision and rollout settings; the MATCHED_RESOLUTION "
                                           "entries must agree as well (§3.1)")
    versions: dict[str, str] | None = _key("library versions: decaf, torch, transformers")
    dataset: str | None = _key("benchmark of the job (§10.1)")
    video_key: str | None = _key("video key of the job in the meta file")
    exp_id: str | None = _key("expression id of the job")
    expression: str | None = _key("the raw expression text")

    def to_record(self) -> dict[str, Any]:
        """The JSON object stored in the file: ``format_version`` first, then every key in field order."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CacheMeta:
        """Read a stored record; keys this version does not know (and ``format_version``) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


#: metadata entries that must agree before an existing cache is reused (§12.2), in field order
MATCHED_SETTINGS = tuple(f.name for f in fields(CacheMeta) if f.metadata["matched"])
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
    def record(self) -> CacheMeta:
        """The metadata as a :class:`CacheMeta`."""
        return CacheMeta.from_record(self.meta)

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


def save_cache(path: str | os.PathLike, maps: Mapping[str, torch.Tensor],
               meta: CacheMeta | Mapping[str, Any]) -> Path:
    """Write the maps (fp32, contiguous) and ``meta`` atomically; the result is validated before the rename.

    ``meta`` is normally a :class:`CacheMeta`; a plain mapping is stored as given (tests write foreign records).
    """
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in maps.items()}
    record = meta.to_record() if isinstance(meta, CacheMeta) else {"format_version": FORMAT_VERSION, **meta}
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


def expected_meta(*, num_input_frames: int, layer_start: int, layer_end: int,
                  prompt_versions: tuple[int, int, int], family: str | None = None, checkpoint: str | None = None,
                  num_layers: int | None = None, resolution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The matched keys a run requires of a cache (§12.2), shaped like the record; keys left None are not checked
    (stage 2 knows neither the family nor the checkpoint, and the depth only when it read the config)."""
    obj, bg, choice = prompt_versions
    wanted: dict[str, Any] = {"family": family, "checkpoint": checkpoint, "num_layers": num_layers,
                              "layer_start": layer_start, "layer_end": layer_end,
                              "num_input_frames": num_input_frames,
                              "prompt_versions": {"obj": obj, "bg": bg, "choice": choice},
                              "settings": dict(resolution) if resolution is not None else None}
    return {key: value for key, value in wanted.items() if value is not None}


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
