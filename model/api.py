"""Python API: segment the object an expression refers to in one video, live (SPEC §1.3, §1.5).

:class:`Segmenter` loads the MLLM and SAM2 once and segments any number of (video, expression) pairs;
:func:`segment` is the one-call form. Each call runs stage 1 without a cache file (the five MLLM calls, §1.2),
fusion (§6), coarse masks (§7) and SAM2 prompting (§8), and returns everything the demo visualises
(:mod:`model.vis.visualize`)::

    from model.api import segment
    result = segment("assets/sample_clip", "the bed")      # or a video file such as clip.mp4
    result.masks        # uint8 (F, H₀, W₀), 0/255, one mask per frame of the video
    result.bool_masks   # the same as bool

A video is a folder of ``.jpg`` frames (listed as SPEC §2.2 says) or a video file (MP4 etc.), whose frames are
decoded in order with OpenCV into a temporary folder of JPEG files, because the MLLM processors and SAM2 both read
frame files. The temporary folder lives as long as the result (or until :meth:`SegmentResult.close`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.adapters import adapter_for_checkpoint
from model.adapters.base import check_checkpoint_files, resolve_layer_range
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.maps.coarse_masks import coarse_masks
from model.maps.fusion import fuse_maps
from model.sam import DEFAULT_SAM2_CHECKPOINT, DEFAULT_SAM2_CONFIG
from model.sam.prompting import (Candidate, candidate_points, load_sam2_predictor, resolve_sam2_config,
                                 sam2_masks)
from model.selftest.tiny.preset import (DEFAULT_TINY_CKPTS, DISCLAIMER, TINY_PRECISION, TINY_SETTINGS,
                                        ensure_tiny_checkpoints, tiny_layout)
from model.settings import DEFAULT_MLLM, SegmentSettings, default_device
from model.utils.errors import DecafError
from model.utils.video import check_frame_sizes, frame_name, list_frames, sample_indices, verify_decodable

log = logging.getLogger("decaf.api")

SAM2_HELP = "see ckpts/README.md for where to put the SAM2 checkpoint"
#: frames of a decoded video file are named 00000.jpg …: five digits keep the name order the frame order
MAX_DECODED_FRAMES = 99_999
JPEG_QUALITY = 95


# ------------------------------------------------------------------------------------------------------ video
def video_name(path: str | os.PathLike) -> str:
    """``vid_name`` of SPEC §12.5: a folder's name, robust to a trailing ``/`` (§14 #45), or a file's stem."""
    absolute = Path(os.path.abspath(path))  # normalises "clip/", "clip/." and "."
    return absolute.stem if absolute.is_file() else absolute.name


def decode_video_file(path: Path, folder: Path) -> float | None:
    """Decode every frame of a video file, in order, with OpenCV into ``folder``/00000.jpg …; return its fps.

    The fps is None when the container does not state a usable one.
    """
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise DecafError(f"cannot open video file {path} with OpenCV; convert it to MP4 (H.264) or pass a "
                             f"folder of .jpg frames")
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if count == MAX_DECODED_FRAMES:
                raise DecafError(f"{path} has more than {MAX_DECODED_FRAMES} frames; cut it into shorter clips")
            target = folder / f"{count:05d}.jpg"
            if not cv2.imwrite(str(target), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise DecafError(f"cannot write the decoded frame {target}")
            count += 1
    finally:
        capture.release()
    if count == 0:
        raise DecafError(f"OpenCV decoded no frame from {path}; is it a video file?")
    return float(fps) if math.isfinite(fps) and fps > 0 else None


@dataclass
class VideoSource:
    """The frame files of one input video (SPEC §2.2), decoded from a video file if needed."""

    path: Path  # as given
    name: str  # vid_name (§12.5)
    frames: list[Path]  # all F frame files, in order
    fps: float | None  # the source frame rate of a video file; None for a frame folder
    _decoded: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    _frame_size: tuple[int, int] | None = field(default=None, repr=False)  # set once every frame was checked

    @classmethod
    def open(cls, video: str | os.PathLike) -> VideoSource:
        """A frame folder as it is, or a video file decoded into a temporary frame folder."""
        path = Path(video)
        if path.is_dir():
            return cls(path, video_name(path), list_frames(path), None)
        if not path.is_file():
            raise DecafError(f"--video_path {path} is neither a frame folder nor a video file")
        decoded = tempfile.TemporaryDirectory(prefix="decaf-frames-")
        try:
            fps = decode_video_file(path, Path(decoded.name))
            frames = list_frames(decoded.name)
        except BaseException:
            decoded.cleanup()
            raise
        log.info("decoded %d frames of %s (%s fps)", len(frames), path, f"{fps:.3f}" if fps else "unknown")
        return cls(path, video_name(path), frames, fps, decoded)

    @property
    def is_file(self) -> bool:
        return self._decoded is not None

    def verify(self) -> tuple[int, int]:
        """Check every frame, not only the sampled ones, before any model loads; return (H₀, W₀).

        All F frames must have one size (SPEC §2.4) and decode fully: SAM2 reads every frame in phase 2 (§8.8),
        and a truncated JPEG passes a header read. The check runs once per source: the demo and :func:`segment`
        check before loading the models, and :meth:`Segmenter.segment` then reuses the result.
        """
        if self._frame_size is None:
            frame_size = check_frame_sizes(self.frames)
            for path in self.frames:
                verify_decodable(path)
            self._frame_size = frame_size
        return self._frame_size

    def close(self) -> None:
        """Remove the temporary frames of a decoded video file (a frame folder is never touched)."""
        if self._decoded is not None:
            self._decoded.cleanup()


def check_checkpoints(version: str | os.PathLike, vision_pretrained: str | os.PathLike,
                      vision_pretrained_config: str) -> type:
    """Check that both checkpoints are complete and the SAM2 config is known, without loading anything; return the
    MLLM's adapter class (read from its ``config.json``)."""
    adapter_class = adapter_for_checkpoint(version)
    check_checkpoint_files(version)
    if not Path(vision_pretrained).is_file():
        raise DecafError(f"SAM2 checkpoint not found: {vision_pretrained}; {SAM2_HELP}")
    resolve_sam2_config(vision_pretrained_config)  # an unknown config name fails now as well
    return adapter_class


def check_expression(expression: str) -> str:
    """The expression stripped of surrounding whitespace (SPEC §1.5); an empty one is an error."""
    stripped = expression.strip()
    if not stripped:
        raise DecafError("the expression is empty; give the object to segment, e.g. --exp \"the dog\"")
    return stripped


# ----------------------------------------------------------------------------------------------------- result
@dataclass
class SegmentResult:
    """Everything one live run produced (SPEC §1.3). Frame-sized arrays are at the video's size (H₀, W₀)."""

    expression: str  # as segmented: stripped of surrounding whitespace (§1.5); §2.1 applies inside the prompts
    source: VideoSource  # frame files, vid_name and fps
    frame_size: tuple[int, int]  # (H₀, W₀)
    key_frame_indices: list[int]  # k_t, the T sampled frames (§2.3)
    masks: np.ndarray  # uint8 (F, H₀, W₀), values {0, 255}: the SAM2 masks of every frame (§8.8)
    phi: torch.Tensor  # Φ, fp32 (T, h_f, w_f) in [0, 1] (§6.6)
    coarse_masks: np.ndarray  # uint8 (T, H₀, W₀), values {0, 255}: Otsu masks of the sampled frames (§7)
    candidate_points: list[list[Candidate]]  # per sampled frame (§8.3)
    texts: dict[str, Any]  # MLLM answers: obj_cls_video, obj_cls_frame, obj_name, … (§12.2 "texts")
    prompts: dict[str, str | None]  # the filled prompt texts {obj, choice, bg}
    degenerate: list[str]  # what fell into a degenerate case (§8.9), empty normally
    num_tracklets: int  # phase-1 tracklets that survived NMS (§8.4)
    selected_tracklets: list[int]  # the ones that prompted phase 2 (§8.7)
    timings: dict[str, float]  # seconds per stage

    @property
    def frame_paths(self) -> list[Path]:
        return self.source.frames

    @property
    def frame_names(self) -> list[str]:
        return [frame_name(path) for path in self.source.frames]

    @property
    def bool_masks(self) -> np.ndarray:
        """The SAM2 masks as bool (F, H₀, W₀)."""
        return self.masks > 0

    def close(self) -> None:
        """Remove the temporary frames of a decoded video file (after visualising)."""
        self.source.close()


# -------------------------------------------------------------------------------------------------- segmenter
class Segmenter:
    """Loads the MLLM and SAM2 once; :meth:`segment` then runs the whole method on any video (SPEC §1.5).

    ``version`` is an MLLM checkpoint folder of any supported family (chosen from its ``config.json``);
    ``vision_pretrained`` / ``vision_pretrained_config`` the SAM2 checkpoint and config. ``device`` defaults to
    CUDA when available; ``precision`` is the MLLM dtype (SAM2 always runs in fp32, §0.6); ``image_processor``
    ``"slow"`` (PIL) or ``"fast"`` (torchvision), None for the family's default (§3.1, §3.2). ``sam2_overrides`` are
    extra Hydra overrides (tests load a 256-px tiny SAM2 with ``++model.image_size=256``). With ``progress``
    each stage logs a line and stage 1 shows a bar over its MLLM passes.

    The SAM2 image features of the last frame folder stay in CPU memory (about 16 MiB per frame at 1024 px) so
    that further expressions on it skip the image encoder; :meth:`close` releases them.
    """

    def __init__(self, version: str | os.PathLike = DEFAULT_MLLM,
                 vision_pretrained: str | os.PathLike = DEFAULT_SAM2_CHECKPOINT,
                 vision_pretrained_config: str = DEFAULT_SAM2_CONFIG, *,
                 settings: SegmentSettings = SegmentSettings(), device: str | None = None,
                 precision: str = "bf16", attn_implementation: str | None = None,
                 sam2_overrides: tuple[str, ...] | list[str] = (), progress: bool = False,
                 image_processor: str | None = None):
        self.settings = settings
        self.progress = progress
        self.device = device or default_device()
        # both checkpoints are checked before either is loaded: a missing SAM2 file must not cost a 7B load
        adapter_class = check_checkpoints(version, vision_pretrained, vision_pretrained_config)
        with self._stage(f"loading {Path(version).name} ({adapter_class.__name__}, {precision}) on {self.device}"):
            self.adapter = adapter_class(version, device=self.device, precision=precision,
                                         attn_implementation=attn_implementation,
                                         image_processor=image_processor, options=settings.adapter_options())
        start, end = resolve_layer_range(self.adapter.num_layers, settings.attn_layer_idx_start,
                                         settings.attn_layer_idx_end)
        self.pipeline = PromptingPipeline(self.adapter, PipelineSettings(
            layer_start=start, layer_end=end, obj_version=settings.prompt_obj_ver,
            bg_version=settings.prompt_bg_ver, choice_version=settings.prompt_obj_cnt_ver,
            attn_max_batch=settings.attn_max_batch, max_new_tokens=settings.max_new_tokens))
        with self._stage(f"loading SAM2 {vision_pretrained_config} on {self.device}"):
            self.predictor = load_sam2_predictor(vision_pretrained_config, vision_pretrained, self.device,
                                                 hydra_overrides=tuple(sam2_overrides))

    # ----- lifecycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the attention-capture hooks and drop the cached SAM2 features."""
        self.pipeline.capture.detach()
        self.predictor.reset_video()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    #: settings read on every :meth:`segment` call; the others are built into the loaded adapter and pipeline
    PER_CALL_SETTINGS = ("num_input_frames", "attn_max_batch", "max_new_tokens", "point_threshold",
                         "final_score_threshold")

    def update_settings(self, **changes: Any) -> None:
        """Change :data:`PER_CALL_SETTINGS` for the next calls without reloading the models (the web demo's knobs).

        Values are validated as :class:`SegmentSettings` validates them; on an error nothing changes.
        """
        fixed = sorted(set(changes) - set(self.PER_CALL_SETTINGS))
        if fixed:
            raise DecafError(f"{', '.join(fixed)} cannot change after loading; only "
                             f"{', '.join(self.PER_CALL_SETTINGS)} can")
        settings = replace(self.settings, **changes)
        self.pipeline.settings = replace(self.pipeline.settings, attn_max_batch=settings.attn_max_batch,
                                         max_new_tokens=settings.max_new_tokens)
        self.settings = settings

    @property
    def layer_range(self) -> tuple[int, int]:
        """The resolved rollout layers [start, end) (SPEC §5.1)."""
        return self.pipeline.settings.layer_start, self.pipeline.settings.layer_end

    @contextlib.contextmanager
    def _stage(self, description: str, timings: dict[str, float] | None = None,
               key: str | None = None) -> Iterator[None]:
        """One log line when a stage starts and one with its duration when it ends."""
        level = logging.INFO if self.progress else logging.DEBUG
        log.log(level, "%s …", description)
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        if timings is not None and key is not None:
            timings[key] = elapsed
        log.log(level, "%s: done in %.1f s", description, elapsed)

    def _stage1_passes(self, num_frames: int) -> int | None:
        """MLLM forward/generate calls of one expression (SPEC §1.2), for the progress bar."""
        return self.pipeline.pass_count(num_frames)

    @contextlib.contextmanager
    def video_session(self) -> Iterator[Segmenter]:
        """Several expressions of one video: inside the block, :meth:`segment` calls share each visual input's MLLM
        prefix (vision tower and visual tokens prefilled once, SPEC §5.8f), so the second and later expressions
        of a video prefill only their own text. The maps equal those of separate calls (within T1, tests) and
        the answers are the same. The prefixes stay on the device until the block ends (stage 1 logs what they
        hold per video); the SAM2 features of the last video are kept in any case.

            with Segmenter(version, sam2_checkpoint) as segmenter, segmenter.video_session():
                results = [segmenter.segment(video, exp) for exp in expressions]
        """
        with self.pipeline.video_session():
            yield self

    # ----- one expression ------------------------------------------------------------------------------------
    def segment(self, video: str | os.PathLike | VideoSource, expression: str) -> SegmentResult:
        """Segment ``expression`` in ``video`` (a frame folder, a video file or an opened :class:`VideoSource`).

        The expression is stripped of surrounding whitespace first (SPEC §1.5), then preprocessed as in §2.1.
        """
        expression = check_expression(expression)
        source = video if isinstance(video, VideoSource) else VideoSource.open(video)
        try:
            return self._segment(source, expression)
        except BaseException:
            if source is not video:
                source.close()
            raise

    def _segment(self, source: VideoSource, expression: str) -> SegmentResult:
        s = self.settings
        timings: dict[str, float] = {}
        frames = source.frames
        frame_size = source.verify()  # §2.4; every frame decodes
        keys = sample_indices(len(frames), s.num_input_frames)  # §2.3
        sampled = [frames[k] for k in keys]

        with self._stage(f"stage 1: MLLM calls on {len(keys)} of {len(frames)} frames", timings, "stage1"), \
                tqdm(total=self._stage1_passes(len(keys)), desc="stage 1 (MLLM passes)", unit="pass",
                     disable=not self.progress, dynamic_ncols=True, leave=False) as bar:
            self.pipeline.bar = bar
            try:
                maps = self.pipeline.run(sampled, expression)
            finally:
                self.pipeline.bar = None
        log.log(logging.INFO if self.progress else logging.DEBUG, "MLLM answers: video %r, object name %r",
                maps.texts.get("obj_cls_video"), maps.texts.get("obj_name"))

        degenerate: list[str] = []
        with self._stage("fusion and coarse masks", timings, "fusion"):
            phi = fuse_maps(maps.maps["obj_video"], maps.maps["obj_frame"], maps.maps.get("bg_video"),
                            maps.maps.get("bg_frame"), key_frame_count=len(keys))  # §6
            coarse = coarse_masks(phi, frame_size)  # §7
            points = candidate_points(phi, s.point_threshold)  # §8.3
        if not bool(phi.max() > 0):
            degenerate.append("the fused map is all zero: the coarse masks are empty")

        with self._stage(f"SAM2 on {len(frames)} frames", timings, "sam2"):
            sam = sam2_masks(self.predictor, phi, frames, keys, point_threshold=s.point_threshold,
                             final_score_threshold=s.final_score_threshold,
                             batch_size=s.sam2_batch, progress=self.progress)
            if source.is_file:  # a decoded file's frames are temporary: keep only a frame folder's features
                self.predictor.reset_video()
        if sam.degenerate:
            degenerate.append(f"{sam.degenerate}: the SAM2 masks are empty (SPEC §8.9)")
        elif not sam.masks.any():
            degenerate.append("SAM2 returned an empty mask on every frame")
        for reason in degenerate:
            log.warning("%s / %r: %s", source.name, expression, reason)
        return SegmentResult(
            expression=expression, source=source, frame_size=frame_size, key_frame_indices=keys,
            masks=sam.masks, phi=phi, coarse_masks=coarse, candidate_points=points, texts=maps.texts,
            prompts=maps.prompts, degenerate=degenerate, num_tracklets=sam.num_tracklets,
            selected_tracklets=sam.selected, timings=timings)


def segment(video: str | os.PathLike, expression: str, *, version: str | os.PathLike = DEFAULT_MLLM,
            vision_pretrained: str | os.PathLike = DEFAULT_SAM2_CHECKPOINT,
            vision_pretrained_config: str = DEFAULT_SAM2_CONFIG, device: str | None = None,
            precision: str = "bf16", attn_implementation: str | None = None,
            sam2_overrides: tuple[str, ...] | list[str] = (), progress: bool = False,
            image_processor: str | None = None, tiny: bool = False,
            tiny_ckpts: str | os.PathLike = DEFAULT_TINY_CKPTS, **settings: Any) -> SegmentResult:
    """Load the models, segment ``expression`` in ``video`` and release the models (SPEC §1.5).

    ``tiny=True`` uses the tiny random-weight checkpoints in ``tiny_ckpts`` (built there on first use) with the
    CPU-sized settings of ``demo.py --tiny``; arguments given explicitly still win. Random weights give meaningless
    masks: it shows that the pipeline runs.

    ``settings`` are fields of :class:`SegmentSettings` (``num_input_frames=16``, ``attn_layer_idx_start="auto"``,
    ``attn_max_token=400``, ``attn_resize_scale=2``, ``attn_max_batch=8``, ``point_threshold=0.8``,
    ``final_score_threshold=0.8``, …). To segment several pairs, keep one :class:`Segmenter` instead.
    Returns a :class:`SegmentResult`; ``result.masks`` is uint8 (F, H₀, W₀) with values {0, 255} for every frame.
    """
    unknown = sorted(set(settings) - set(SegmentSettings.field_names()))
    if unknown:
        raise TypeError(f"segment() got unknown settings {unknown}; valid: {', '.join(SegmentSettings.field_names())}")
    if tiny:
        preset = tiny_layout(tiny_ckpts)
        if version == DEFAULT_MLLM:
            version = preset.version
        if vision_pretrained == DEFAULT_SAM2_CHECKPOINT:
            vision_pretrained, vision_pretrained_config = preset.vision_pretrained, preset.vision_pretrained_config
            sam2_overrides = sam2_overrides or preset.sam2_overrides
        precision = TINY_PRECISION if precision == "bf16" else precision
        settings = {**TINY_SETTINGS, **settings}
        log.warning("tiny=True: %s", DISCLAIMER)
        ensure_tiny_checkpoints(tiny_ckpts)
    segment_settings = SegmentSettings(**settings)
    # the expression and every frame are checked before the models load (a bad frame must not cost a 7B load)
    expression = check_expression(expression)
    check_checkpoints(version, vision_pretrained, vision_pretrained_config)
    source = VideoSource.open(video)
    try:
        source.verify()
        with Segmenter(version, vision_pretrained, vision_pretrained_config, settings=segment_settings,
                       device=device, precision=precision, attn_implementation=attn_implementation,
                       sam2_overrides=sam2_overrides, progress=progress,
                       image_processor=image_processor) as segmenter:
            return segmenter.segment(source, expression)
    except BaseException:
        source.close()
        raise
