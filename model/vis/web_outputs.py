"""Outputs of the web demo (:mod:`model.webdemo`) for one segmentation: a browser-playable overlay video, the
gallery of sampled frames and a ZIP of the mask PNGs.

The pictures are drawn with :mod:`model.vis.visualize` (the same red overlay, JET heat map and point discs as the CLI
demo's ``--save_per_frame`` images, SPEC §12.5); only the containers differ, because a browser must show them:

* the video: the CLI demo's 'mp4v' MP4 (MPEG-4 Part 2) does not play in browsers, so the first codec OpenCV can
  write that browsers play is used: H.264 in MP4 where OpenCV's FFmpeg has an H.264 encoder (the PyPI
  ``opencv-python-headless`` wheels have none), else VP9 or VP8 in WebM (Chromium and Firefox play both);
* the masks: one ZIP instead of a folder, since a page offers files, not folders.

Every file is written atomically (:mod:`model.utils.atomic`), so a failed request never leaves a half-written download.
"""
from __future__ import annotations

import functools
import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from model.utils.atomic import atomic_write_bytes
from model.utils.errors import DecafError
from model.vis.visualize import (DEFAULT_VIDEO_FPS, MAGENTA, blend, count_video_frames, draw_points, encode_png,
                                 heat_map, read_bgr, red_overlay, resized_mask, write_mask_video)

if TYPE_CHECKING:
    from model.api import SegmentResult

#: (fourcc, file suffix) in order of preference: what browsers play, most widely first
BROWSER_CODECS = (("avc1", ".mp4"), ("VP90", ".webm"), ("VP80", ".webm"))
#: the gallery's images per sampled frame, in display order (one gallery row per frame)
GALLERY_KINDS = ("fused map Φ", "coarse mask", "prompt points", "SAM2 mask")
#: a probe clip: large enough for every encoder's minimum frame size
_PROBE_SIZE = (64, 64)


@dataclass(frozen=True)
class VideoCodec:
    fourcc: str
    suffix: str


@functools.lru_cache(maxsize=1)
def browser_codec() -> VideoCodec:
    """The first of :data:`BROWSER_CODECS` this OpenCV build writes and decodes back (probed once per process)."""
    with tempfile.TemporaryDirectory(prefix="decaf-codec-probe-") as folder:
        for fourcc, suffix in BROWSER_CODECS:
            path = Path(folder) / f"probe{suffix}"
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), DEFAULT_VIDEO_FPS, _PROBE_SIZE)
            if not writer.isOpened():
                continue
            for value in (0, 255):
                writer.write(np.full((*_PROBE_SIZE[::-1], 3), value, np.uint8))
            writer.release()
            if count_video_frames(path) == 2:
                return VideoCodec(fourcc, suffix)
    raise DecafError("this OpenCV build writes none of H.264/MP4, VP9/WebM and VP8/WebM; install "
                     "opencv-python-headless from PyPI (it writes VP9/WebM)")


def write_overlay_video(result: SegmentResult, folder: str | os.PathLike) -> Path:
    """``{folder}/{vid_name}_sam_mask.{mp4|webm}`` in the first codec browsers play (:func:`browser_codec`), drawn
    as the CLI demo's video (:func:`model.vis.visualize.write_mask_video`)."""
    codec = browser_codec()
    return write_mask_video(result, Path(folder) / f"{result.source.name}_sam_mask{codec.suffix}", codec.fourcc)


def write_gallery(result: SegmentResult, folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Half-size PNGs of every sampled frame: Φ blended 50/50 as a JET heat map, the coarse mask and the SAM2
    mask as red overlays, the candidate points as magenta discs (SPEC §12.5's per-frame images); returns
    (path, caption) in the order of :data:`GALLERY_KINDS`, frame by frame."""
    height, width = result.frame_size
    size = (max(width // 2, 1), max(height // 2, 1))
    names = result.frame_names
    items = []
    for t, k in enumerate(result.key_frame_indices):
        frame = cv2.resize(read_bgr(result.frame_paths[k]), size)
        images = (blend(frame, heat_map(result.phi[t].numpy(), size)),
                  red_overlay(frame, resized_mask(result.coarse_masks[t], size)),
                  draw_points(frame, result.candidate_points[t], MAGENTA),
                  red_overlay(frame, resized_mask(result.masks[k], size)))
        for kind, slug, image in zip(GALLERY_KINDS, ("phi", "coarse", "points", "sam2"), images):
            path = Path(folder) / f"{t:03d}_{names[k]}_{slug}.png"
            atomic_write_bytes(path, encode_png(image, path))
            caption = f"frame {names[k]}: {kind}"
            if slug == "points":
                caption += f" ({len(result.candidate_points[t])})"
            items.append((path, caption))
    return items


def write_mask_zip(result: SegmentResult, path: str | os.PathLike) -> Path:
    """A ZIP of the SAM2 mask of every frame as ``{vid_name}_masks/<frame>.png``, 8-bit 0/255 (SPEC §12.3
    format, as the CLI demo's mask folder)."""
    path = Path(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, mask in zip(result.frame_names, result.masks):
            archive.writestr(f"{result.source.name}_masks/{name}.png", encode_png(mask, path))
    return atomic_write_bytes(path, buffer.getvalue())
