"""Demo outputs of one segmentation (SPEC §12.5): the stacked overview PNG, per-frame PNGs, an MP4 and mask PNGs.

All images are BGR (OpenCV). Every file is written atomically and every folder in one rename (§12.6):

* ``{vis_save_path}/{vid_name}_all.png``: a white 100-px header with ``Exp: <expression>`` and, at its foot, the
  title of each column; then one row per sampled frame, rows separated by 10-px black bars. A row holds five tiles
  of (⌊W₀/4⌋, ⌊H₀/4⌋) separated by 10-px black bars: the frame (its name in the corner); Φ as a JET heat map blended
  50/50; the coarse Otsu mask, JET 50/50; the candidate points (green discs of radius 5); the SAM2 mask of that
  frame, JET 50/50. The image is therefore (5·⌊W₀/4⌋ + 40) px wide and (100 + T·⌊H₀/4⌋ + 10·(T − 1)) px high
  (:func:`stacked_size`). When SAM2 found nothing, the header says so in red.
* ``--save_per_frame``: ``{vis_save_path}/{vid_name}/{img,attn_map,coarse_mask,points}/<frame>.png`` for the T
  sampled frames and ``sam_mask/<frame>.png`` for all F frames, each (⌊W₀/2⌋, ⌊H₀/2⌋). Masks are drawn as in the
  paper's figures (:func:`red_overlay`), points as magenta discs of radius 5.
* ``--save_video`` (extension): ``{vis_save_path}/{vid_name}_sam_mask.mp4``, all F frames at (W₀, H₀) with the
  SAM2 mask drawn as above and the frame name and expression written in the corner, at the source frame rate of a
  video file, else 10 fps ('mp4v' codec).
* mask PNGs: ``{vis_save_path}/{vid_name}/masks/<frame>.png``, 8-bit single-channel, 0/255, every frame (§12.3
  format).

Maps and masks are drawn as the paper's figures are: Φ is quantised to 8 bits (``uint8(x·255)``, truncated) before
it is resized, masks are resized with bilinear interpolation, text is antialiased.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from model.utils.atomic import atomic_directory, atomic_write, atomic_write_bytes
from model.utils.errors import DecafError
from model.utils.mask_png import write_mask_folder

if TYPE_CHECKING:
    from model.api import SegmentResult
    from model.sam.prompting import Candidate

HEADER_HEIGHT = 100
BAR = 10  # black separator width/height, px
HEADER_TEXT_ORIGIN = (20, 50)
TILES_PER_ROW = 5
POINT_RADIUS = 5
GREEN = (0, 255, 0)
MAGENTA = (255, 0, 255)  # what the reference draws in its per-frame points (its comment says green)
RED = (0, 0, 255)
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX
#: column titles at the foot of the overview's header, one per tile (issue: the overview must explain itself)
COLUMN_TITLES = ("frame", "fused map Phi", "coarse mask", "SAM2 prompts", "SAM2 mask")
TITLE_BASELINE = HEADER_HEIGHT - 12
DEFAULT_VIDEO_FPS = 10.0
PER_FRAME_FOLDERS = ("img", "attn_map", "coarse_mask", "points", "sam_mask")


# ------------------------------------------------------------------------------------------------- drawing
def read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DecafError(f"cannot decode image {path}")
    return image


def quantise(values: np.ndarray) -> np.ndarray:
    """``uint8(x·255)`` of a map in [0, 1], x·255 in fp32 and truncated toward zero (as SPEC §7.2)."""
    return (values.astype(np.float32) * np.float32(255)).astype(np.uint8)


def heat_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map in [0, 1] quantised to 8 bits, then resized to ``size`` = (w, h) with ``INTER_LINEAR``, as a JET
    colour image."""
    return cv2.applyColorMap(cv2.resize(quantise(values), size, interpolation=cv2.INTER_LINEAR), cv2.COLORMAP_JET)


def mask_heat_map(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask resized (bilinear) to ``size`` = (w, h), as a JET colour image."""
    return cv2.applyColorMap(resized_mask(mask, size), cv2.COLORMAP_JET)


def blend(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """50/50 blend of a frame and a colour image."""
    return cv2.addWeighted(image, 0.5, colour, 0.5, 0)


def red_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The paper's mask figure: the frame blended 50/50 with a layer that is red on the mask and black elsewhere
    (so the frame is darkened to half outside the mask), plus the mask's 1-px black external contours.

    ``mask`` is 0…255 at the image's size; a bilinearly resized mask blends its soft edge proportionally.
    """
    alpha = mask.astype(np.float32)[..., None] / np.float32(255)
    layer = (alpha * np.array(RED, np.float32)).round().astype(np.uint8)
    out = cv2.addWeighted(image, 0.5, layer, 0.5, 0)
    binary = (mask >= 128).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, BLACK, 1)
    return out


def label(image: np.ndarray, text: str, scale: float = 0.5) -> np.ndarray:
    """``text`` in white on a black box in the top-left corner (frame names on tiles, captions on video frames)."""
    out = image.copy()
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, 1)
    cv2.rectangle(out, (0, 0), (width + 8, height + baseline + 8), BLACK, -1)
    cv2.putText(out, text, (4, height + 4), FONT, scale, WHITE, 1, cv2.LINE_AA)
    return out


def draw_points(image: np.ndarray, points: Sequence[Candidate], colour: tuple[int, int, int]) -> np.ndarray:
    """Filled discs of radius 5 at round(relative coordinate × image size)."""
    out = image.copy()
    height, width = image.shape[:2]
    for point in points:
        cv2.circle(out, (int(round(point.x * width)), int(round(point.y * height))), POINT_RADIUS, colour, -1)
    return out


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask resized to ``size`` = (w, h) with bilinear interpolation (soft edges, as in the figures)."""
    return cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------------------- stacked image
def tile_size(frame_size: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of one tile of the stacked image: a quarter of the frame, rounded down (§12.5)."""
    height, width = frame_size
    return width // 4, height // 4


def stacked_size(frame_size: tuple[int, int], num_sampled: int) -> tuple[int, int]:
    """(height, width) of the stacked image for frames of ``frame_size`` = (H₀, W₀) and T sampled frames."""
    width, height = tile_size(frame_size)
    return (HEADER_HEIGHT + num_sampled * height + BAR * (num_sampled - 1),
            TILES_PER_ROW * width + BAR * (TILES_PER_ROW - 1))


def stacked_image(result: SegmentResult) -> np.ndarray:
    """The overview image of SPEC §12.5 (BGR), with column titles and frame names."""
    size = tile_size(result.frame_size)
    width, height = size
    if width == 0 or height == 0:
        raise DecafError(f"frames of {result.frame_size[1]}x{result.frame_size[0]} px are too small for the "
                         f"overview (tiles are a quarter of the frame)")
    vertical_bar = np.zeros((height, BAR, 3), np.uint8)
    names = result.frame_names
    rows = []
    for t, k in enumerate(result.key_frame_indices):
        frame = cv2.resize(read_bgr(result.frame_paths[k]), size)
        tiles = [label(frame, f"frame {names[k]}"),
                 blend(frame, heat_map(result.phi[t].numpy(), size)),
                 blend(frame, mask_heat_map(result.coarse_masks[t], size)),
                 draw_points(frame, result.candidate_points[t], GREEN),
                 blend(frame, mask_heat_map(result.masks[k], size))]
        row = [tiles[0]]
        for tile in tiles[1:]:
            row += [vertical_bar, tile]
        rows.append(np.hstack(row))
    total_width = rows[0].shape[1]
    header = np.full((HEADER_HEIGHT, total_width, 3), 255, np.uint8)
    cv2.putText(header, f"Exp: {result.expression}", HEADER_TEXT_ORIGIN, FONT, 1, BLACK, 2, cv2.LINE_AA)
    if not result.masks.any():
        note = "SAM2 found no object: the mask is empty on every frame"
        (text_width, _), _ = cv2.getTextSize(note, FONT, 0.6, 1)
        cv2.putText(header, note, (max(total_width - text_width - 20, 20), 25), FONT, 0.6, RED, 1, cv2.LINE_AA)
    for column, title in enumerate(COLUMN_TITLES):
        cv2.putText(header, title, (column * (width + BAR) + 4, TITLE_BASELINE), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
    horizontal_bar = np.zeros((BAR, total_width, 3), np.uint8)
    parts = [header, rows[0]]
    for row in rows[1:]:
        parts += [horizontal_bar, row]
    return np.vstack(parts)


# ---------------------------------------------------------------------------------------------------- writing
def encode_png(image: np.ndarray, path: Path) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise DecafError(f"cannot encode {path} as PNG")
    return data.tobytes()


def save_stacked(result: SegmentResult, vis_save_path: str | os.PathLike) -> Path:
    """``{vis_save_path}/{vid_name}_all.png`` (§12.5)."""
    path = Path(vis_save_path) / f"{result.source.name}_all.png"
    return atomic_write_bytes(path, encode_png(stacked_image(result), path))


def _write_png_folder(folder: Path, images: dict[str, np.ndarray]) -> None:
    with atomic_directory(folder) as tmp:
        for name, image in images.items():
            (tmp / f"{name}.png").write_bytes(encode_png(image, folder / f"{name}.png"))


def save_per_frame(result: SegmentResult, vis_save_path: str | os.PathLike) -> Path:
    """The ``--save_per_frame`` folders of §12.5 under ``{vis_save_path}/{vid_name}/``; returns that folder."""
    root = Path(vis_save_path) / result.source.name
    height, width = result.frame_size
    size = (width // 2, height // 2)
    names = result.frame_names
    sampled: dict[str, dict[str, np.ndarray]] = {folder: {} for folder in PER_FRAME_FOLDERS[:4]}
    for t, k in enumerate(result.key_frame_indices):
        frame = cv2.resize(read_bgr(result.frame_paths[k]), size)
        sampled["img"][names[k]] = frame
        sampled["attn_map"][names[k]] = blend(frame, heat_map(result.phi[t].numpy(), size))
        sampled["coarse_mask"][names[k]] = red_overlay(frame, resized_mask(result.coarse_masks[t], size))
        sampled["points"][names[k]] = draw_points(frame, result.candidate_points[t], MAGENTA)
    for folder, images in sampled.items():
        _write_png_folder(root / folder, images)
    with atomic_directory(root / "sam_mask") as tmp:  # all F frames, one at a time
        for k, path in enumerate(result.frame_paths):
            image = red_overlay(cv2.resize(read_bgr(path), size), resized_mask(result.masks[k], size))
            (tmp / f"{names[k]}.png").write_bytes(encode_png(image, root / "sam_mask" / f"{names[k]}.png"))
    return root


def save_video(result: SegmentResult, vis_save_path: str | os.PathLike) -> Path:
    """``{vis_save_path}/{vid_name}_sam_mask.mp4`` ('mp4v'), see :func:`write_mask_video`."""
    return write_mask_video(result, Path(vis_save_path) / f"{result.source.name}_sam_mask.mp4", "mp4v")


def write_mask_video(result: SegmentResult, path: Path, fourcc: str) -> Path:
    """Every frame with its SAM2 mask (red, α 0.5, contours) and, in the corner, the frame name and the expression,
    at the source frame rate of a video file, else 10 fps, encoded with ``fourcc`` in the container of ``path``'s
    suffix; checked to decode back to F frames, then renamed into place."""
    fps = result.source.fps or DEFAULT_VIDEO_FPS
    height, width = result.frame_size
    names = result.frame_names

    def write(tmp: Path) -> None:
        # OpenCV picks the container from the file extension, which the temporary name lacks
        staging = tmp.with_name(tmp.name + path.suffix)
        try:
            writer = cv2.VideoWriter(str(staging), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
            if not writer.isOpened():
                raise DecafError(f"OpenCV cannot write {fourcc!r} video of {width}x{height} to {path.parent}")
            try:
                for k, frame_path in enumerate(result.frame_paths):
                    frame = red_overlay(read_bgr(frame_path), result.masks[k])
                    writer.write(label(frame, f"frame {names[k]}  |  {result.expression}", scale=0.7))
            finally:
                writer.release()
            decoded = count_video_frames(staging)
            if decoded != len(result.frame_paths):
                raise DecafError(f"the video written to {path} decodes to {decoded} frames instead of "
                                 f"{len(result.frame_paths)}")
            os.replace(staging, tmp)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink()

    return atomic_write(path, write)


def count_video_frames(path: Path) -> int:
    """Frames OpenCV decodes from a video file (read one by one: container counts can be estimates)."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    try:
        while capture.isOpened() and capture.read()[0]:
            count += 1
    finally:
        capture.release()
    return count


def save_masks(result: SegmentResult, vis_save_path: str | os.PathLike) -> Path:
    """``{vis_save_path}/{vid_name}/masks/<frame>.png``: the SAM2 mask of every frame, 0/255 (format of §12.3)."""
    return write_mask_folder(Path(vis_save_path) / result.source.name / "masks", result.frame_names, result.masks)


def save_outputs(result: SegmentResult, vis_save_path: str | os.PathLike, *, per_frame: bool = False,
                 video: bool = False, masks: bool = True) -> dict[str, Path]:
    """Write the stacked image and the requested extras; returns {what: path}."""
    outputs = {"stacked": save_stacked(result, vis_save_path)}
    if masks:
        outputs["masks"] = save_masks(result, vis_save_path)
    if per_frame:
        outputs["per_frame"] = save_per_frame(result, vis_save_path)
    if video:
        outputs["video"] = save_video(result, vis_save_path)
    return outputs
