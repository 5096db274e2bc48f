"""SAM2 for DecAF: model loading, the predictor subclass with behaviours B1–B4, and the per-video feature cache.

SPEC §8.1 (model and configuration), §8.2 (required predictor behaviours), §8.10 (feature cache). The ``sam2``
package (1.1.0) is used as installed; every behaviour change is an override in :class:`DecafSAM2Predictor`:

* **B1** :meth:`~DecafSAM2Predictor.init_state_from_frames` opens a session on an explicit, ordered list of frame
  files, decoding each with sam2's own per-image loader (``sam2.utils.misc._load_img_as_tensor``) and normalising
  exactly as ``load_video_frames`` does;
* **B2** :meth:`~DecafSAM2Predictor.add_new_points_with_iou` returns the predicted IoU of the mask SAM2 kept;
* **B3/B4** :meth:`~DecafSAM2Predictor.propagate_in_video` processes frame 0 when reverse propagation starts there
  and shows no progress bar; every other step is the stock one.

The pipeline itself drives SAM2 through :meth:`~DecafSAM2Predictor.decode_points` (B2 for a batch of single-point
objects) and :meth:`~DecafSAM2Predictor.track_masks` (mask prompts of one frame tracked forward, then backward to
frame 0, B3), which run the stock per-frame steps (``_run_single_frame_inference``, ``_run_memory_encoder``) on a
batch of independent objects with their own memory bank (SPEC §8.10); with one object they are exactly the stock
``add_new_points_or_box`` / ``add_new_mask`` + ``propagate_in_video`` computation.

SAM2 runs in fp32 without autocast and with PyTorch's default TF32 flags (§0.6, §8.1); nothing here changes them.
"""
from __future__ import annotations

import functools
import logging
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import sam2
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_video_predictor import SAM2VideoPredictor
from sam2.utils.misc import _load_img_as_tensor

from model.sam import DEFAULT_SAM2_CHECKPOINT, DEFAULT_SAM2_CONFIG
from model.utils.errors import DecafError
from model.utils.video import check_frame_sizes

log = logging.getLogger(__name__)

CKPT_HELP = "see ckpts/README.md for where to put the SAM2 checkpoint"
#: the inference configs shipped inside the sam2 package (SAM 2.0 and SAM 2.1); names resolve against these
SHIPPED_CONFIG_DIRS = ("configs/sam2", "configs/sam2.1")
#: ImageNet normalisation, the defaults of ``sam2.utils.misc.load_video_frames``
IMAGE_MEAN = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
IMAGE_STD = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]

# extra keys of a DecAF session state (the stock keys are kept unchanged)
_FEATURE_CACHE = "decaf_feature_cache"
_VIDEO_FRAME_INDICES = "decaf_video_frame_indices"
# The stock feature lookup returns the frame image next to its features, but no caller in sam2 1.1.0 uses it;
# cached sessions hold no images and hand this empty stand-in instead (it only has to support .expand()).
_NO_IMAGE = torch.empty(1, 0, 0, 0)


@functools.cache
def sam2_extension_loaded() -> bool:
    """Whether sam2's compiled ``_C`` extension imports, which hole filling needs (SPEC §8.1); logged once.

    Without it SAM2 skips filling holes of area ≤ 8 in the low-resolution logits and masks differ slightly. The
    kernel is CUDA-only, so on a CPU device hole filling is skipped even when the extension loads. SAM2 itself
    would warn about the missing extension again, with the same import error, on the first hole filling of the
    process; that warning (exactly that message) is silenced here, so the user reads it once, from us.
    """
    try:
        from sam2 import _C  # noqa: F401
    except (ImportError, OSError) as exc:
        # sam2.utils.misc.fill_holes_in_mask_scores warns f"{error}\n\nSkipping the post-processing step …"
        warnings.filterwarnings("ignore", message=re.escape(str(exc)) + r"\n\nSkipping the post-processing step",
                                category=UserWarning)
        log.warning("SAM2 _C extension not available (%s): hole filling (fill_hole_area=8) is skipped, masks "
                    "differ slightly from a build with it (SPEC §8.1)", exc)
        return False
    log.info("SAM2 _C extension loaded: hole filling is active on CUDA devices")
    return True


def resolve_sam2_config(name: str) -> str:
    """The hydra name of a shipped SAM2 config (SPEC §8.1).

    A bare file name resolves inside ``configs/sam2`` or ``configs/sam2.1`` (``sam2_hiera_l.yaml`` →
    ``configs/sam2/sam2_hiera_l.yaml``, SAM 2.0 Hiera-L); a name with its folder is taken as is. ``.yaml`` may be
    omitted.
    """
    package_root = Path(sam2.__file__).parent
    shipped = sorted(path.relative_to(package_root).as_posix()
                     for folder in SHIPPED_CONFIG_DIRS for path in (package_root / folder).glob("*.yaml"))
    by_file_name = {Path(config).name: config for config in shipped}
    for candidate in (name, f"{name}.yaml"):
        if candidate in shipped:
            return candidate
        if candidate in by_file_name:
            return by_file_name[candidate]
    raise DecafError(f"unknown SAM2 config {name!r}; use one of {', '.join(sorted(by_file_name))} "
                     f"(optionally with its folder, e.g. configs/sam2.1/sam2.1_hiera_l.yaml)")


def _read_checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a SAM2 release checkpoint, read the way sam2's own loader reads it."""
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DecafError(f"cannot read SAM2 checkpoint {checkpoint}: {reason}; {CKPT_HELP}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise DecafError(f"{checkpoint} is not a SAM2 checkpoint (no 'model' state dict); {CKPT_HELP}")
    return content["model"]


#: weights that only SAM 2.1 models have (the 2.1 configs add ``no_obj_embed_spatial`` and a projection of the
#: object pointers' temporal encoding, ``proj_tpos_enc_in_obj_ptrs``); SAM 2.0 checkpoints hold neither
SAM2_1_ONLY_WEIGHTS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")


def _check_release(weights: dict[str, torch.Tensor], config_name: str, checkpoint: Path) -> None:
    """A SAM 2.1 checkpoint with a SAM 2.0 config, or the reverse, fails here, before the model is built."""
    checkpoint_is_2_1 = any(key in weights for key in SAM2_1_ONLY_WEIGHTS)
    config_is_2_1 = config_name.startswith("configs/sam2.1/")
    if checkpoint_is_2_1 == config_is_2_1:
        return
    name = Path(config_name).name
    counterpart = name.replace("sam2_", "sam2.1_", 1) if checkpoint_is_2_1 else name.replace("sam2.1_", "sam2_", 1)
    release, other = ("SAM 2.1", "SAM 2.0") if checkpoint_is_2_1 else ("SAM 2.0", "SAM 2.1")
    raise DecafError(f"SAM2 checkpoint {checkpoint} is a {release} checkpoint but config {config_name} is "
                     f"{other}; pass --vision_pretrained_config {counterpart}")


def load_sam2_predictor(config: str = DEFAULT_SAM2_CONFIG, checkpoint: str | Path = DEFAULT_SAM2_CHECKPOINT,
                        device: str | torch.device = "cuda",
                        hydra_overrides: Sequence[str] = ()) -> DecafSAM2Predictor:
    """Build :class:`DecafSAM2Predictor` with sam2's video-predictor builder and load ``checkpoint`` (SPEC §8.1).

    The builder runs with ``apply_postprocessing=True`` and ``vos_optimized=False`` (dynamic multimask, binarised
    point masks for the memory encoder, ``fill_hole_area=8``); ``hydra_overrides`` are appended to its overrides
    (tests pass ``++model.image_size=256``). The weights are loaded with the same strict key check as sam2's own
    loader, but here, so that a missing or mismatched file becomes a one-line :class:`DecafError`. fp32, eval mode.
    """
    config_name = resolve_sam2_config(config)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DecafError(f"SAM2 checkpoint not found: {checkpoint}; {CKPT_HELP}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DecafError(f"SAM2 device {device} requested but CUDA is not available; use --device cpu")
    weights = _read_checkpoint_weights(checkpoint)
    _check_release(weights, config_name, checkpoint)
    predictor_class = f"{DecafSAM2Predictor.__module__}.{DecafSAM2Predictor.__qualname__}"
    predictor = build_sam2_video_predictor(
        config_name, ckpt_path=None, device="cpu", mode="eval",
        hydra_overrides_extra=[f"++model._target_={predictor_class}", *hydra_overrides],
        apply_postprocessing=True, vos_optimized=False)
    try:
        missing, unexpected = predictor.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # tensor shapes differ
        raise DecafError(f"SAM2 checkpoint {checkpoint} does not fit config {config_name} (weight shapes differ); "
                         f"{CKPT_HELP}") from exc
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise DecafError(f"SAM2 checkpoint {checkpoint} does not fit config {config_name}: {len(missing)} missing "
                         f"and {len(unexpected)} unexpected weights (e.g. {example}); {CKPT_HELP}")
    predictor.to(device).eval()
    sam2_extension_loaded()
    log.info("SAM2 loaded: %s from %s on %s (image size %d)", config_name, checkpoint, device,
             predictor.image_size)
    return predictor


def load_frame(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One frame as SAM2's JPEG-folder loader prepares it (SPEC §8.2 B1): (3, S, S) fp32, normalised, CPU.

    sam2's per-image decoder resizes non-uniformly to S×S with Pillow's default filter; the fp64 [0, 1] pixels
    are rounded to fp32 (as the stock loader's assignment into an fp32 tensor does) and normalised with ImageNet
    mean and std. Returns the image and the original (height, width).
    """
    try:
        image, height, width = _load_img_as_tensor(str(path), image_size)
    except (UnidentifiedImageError, OSError, ValueError, RuntimeError) as exc:
        raise DecafError(f"cannot decode frame {path}: {exc}") from exc
    image = image.float()
    image -= IMAGE_MEAN
    image /= IMAGE_STD
    return image, (height, width)


def _check_size(path: Path, size: tuple[int, int], expected: tuple[int, int]) -> None:
    if size != expected:
        raise DecafError(f"frame {path} is {size[1]}x{size[0]} but frame 0 of its video is "
                         f"{expected[1]}x{expected[0]}; all frames of a video must have one size (SPEC §2.4)")


def _new_output_dict() -> dict[str, dict[int, Any]]:
    """An empty memory bank of one (batch of) object(s), as the stock state keeps it per object."""
    return {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}


class FeatureCache:
    """Image-encoder outputs per full-video frame index, shared by both phases and all expressions (SPEC §8.10).

    A frame is decoded and encoded the first time a session asks for it and never again for this video, so a
    video costs at most F encoder passes however many expressions and prompts it has. The sine position
    encodings are the same for every frame (sam2 caches them by shape) and are kept once. With
    ``offload_to_cpu`` the per-frame features (16 MiB per frame for 1024-px models) live in CPU memory and are
    copied to the device on use; copies are exact, so the masks do not change (T3).
    """

    def __init__(self, predictor: DecafSAM2Predictor, frame_paths: list[Path], offload_to_cpu: bool = True):
        self.predictor = predictor
        self.frame_paths = [Path(path) for path in frame_paths]
        self.video_size = check_frame_sizes(self.frame_paths)  # (H₀, W₀), SPEC §2.4
        self.offload_to_cpu = offload_to_cpu
        #: how many frames were actually encoded (for benchmarks)
        self.encoder_calls = 0
        self._features: dict[int, list[torch.Tensor]] = {}
        self._position_encodings: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.frame_paths)

    def backbone_out(self, video_frame_index: int) -> dict[str, list[torch.Tensor]]:
        """The image encoder's output for one video frame, on the predictor's device, as ``forward_image`` gives it."""
        features = self._features.get(video_frame_index)
        if features is None:
            features = self._encode(video_frame_index)
        device = self.predictor.device
        return {"backbone_fpn": [feature.to(device) for feature in features],
                "vision_pos_enc": list(self._position_encodings)}

    @torch.inference_mode()
    def _encode(self, video_frame_index: int) -> list[torch.Tensor]:
        path = self.frame_paths[video_frame_index]
        image, size = load_frame(path, self.predictor.image_size)
        _check_size(path, size, self.video_size)
        # the same call as SAM2VideoPredictor._get_image_feature on a cache miss
        backbone_out = self.predictor.forward_image(image.to(self.predictor.device).float().unsqueeze(0))
        self.encoder_calls += 1
        position_encodings = backbone_out["vision_pos_enc"]
        if self._position_encodings is None:
            self._position_encodings = position_encodings
        elif not all(torch.equal(a, b) for a, b in zip(position_encodings, self._position_encodings)):
            raise RuntimeError("SAM2 position encodings differ between frames; the feature cache assumes they do not")
        features = [feature.cpu() if self.offload_to_cpu else feature for feature in backbone_out["backbone_fpn"]]
        self._features[video_frame_index] = features
        return features


class DecafSAM2Predictor(SAM2VideoPredictor):
    """``SAM2VideoPredictor`` plus behaviours B1–B4 of SPEC §8.2 and sessions backed by a :class:`FeatureCache`.

    Nothing else changes: every mask still comes from the stock decoding, memory and tracking code.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.clear_non_cond_mem_around_input:
            # the stock code path calls a helper that sam2 1.1.0 never defines (SPEC §14, notes)
            raise ValueError("clear_non_cond_mem_around_input is not supported by sam2 1.1.0")
        #: image-encoder passes made by this predictor (benchmarks, SPEC §8.11)
        self.encoder_calls = 0
        #: frames processed by :meth:`track_masks`, each one step for a whole batch of objects (benchmarks)
        self.tracking_steps = 0
        self._captured_ious: list[torch.Tensor] | None = None
        #: image features of the current video (:meth:`set_video`), as segment-anything's predictor keeps the
        #: embedding of its current image: every session and expression of the video reuses them
        self.video_features: FeatureCache | None = None

    # ---- the current video's image features (§8.10) -----------------------------------------------------------

    def set_video(self, frame_paths: Sequence[str | Path], offload_to_cpu: bool = True) -> FeatureCache:
        """Make ``frame_paths`` (all F frames, in order) the current video and return its feature cache.

        The features of the same frame list are kept, so the expressions of a video encode each frame at most
        once; another list replaces them (one video's features are held at a time).
        """
        paths = [Path(path) for path in frame_paths]
        if self.video_features is None or self.video_features.frame_paths != paths:
            self.video_features = FeatureCache(self, paths, offload_to_cpu=offload_to_cpu)
        return self.video_features

    def reset_video(self) -> None:
        """Drop the current video's features (e.g. the temporary frames of a decoded video file)."""
        self.video_features = None

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, Any]:
        self.encoder_calls += int(img_batch.shape[0])
        return super().forward_image(img_batch)

    # ---- sessions (B1, §8.10) ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def init_state_from_frames(self, frame_paths: Sequence[Path], offload_video_to_cpu: bool = False,
                               offload_state_to_cpu: bool = False) -> dict[str, Any]:
        """B1: the stock ``init_state`` on an explicit, ordered list of frame files (SPEC §8.2).

        Each frame is prepared as the stock JPEG-folder loader prepares it (:func:`load_frame`); the video size is
        that of the frames, which must all be equal (§2.4). Like the stock method it encodes frame 0 at once.
        """
        if not frame_paths:
            raise ValueError("a SAM2 session needs at least one frame")
        images = torch.zeros(len(frame_paths), 3, self.image_size, self.image_size, dtype=torch.float32)
        video_size = None
        for index, path in enumerate(frame_paths):
            images[index], size = load_frame(Path(path), self.image_size)
            video_size = video_size or size
            _check_size(Path(path), size, video_size)
        if not offload_video_to_cpu:
            images = images.to(self.device)
        state = self._new_state(images, len(frame_paths), video_size, offload_video_to_cpu, offload_state_to_cpu)
        self._get_image_feature(state, frame_idx=0, batch_size=1)  # stock warm-up of the one-frame cache
        return state

    def init_state_from_cache(self, features: FeatureCache, video_frame_indices: Sequence[int]) -> dict[str, Any]:
        """A session whose frame ``i`` is video frame ``video_frame_indices[i]``, with features from ``features``.

        Phase 1 opens it on the sampled indices (session frame t = video frame k_t), phase 2 on all F frames
        (SPEC §8.4, §8.8, §8.10). It holds no images: every feature lookup is served by the cache.
        """
        if features.predictor is not self:
            raise ValueError("the feature cache belongs to another predictor")
        indices = [int(index) for index in video_frame_indices]
        if not indices or min(indices) < 0 or max(indices) >= len(features):
            raise ValueError(f"session frame indices must lie in [0, {len(features)}), got {indices}")
        state = self._new_state(None, len(indices), features.video_size, True, False)
        state[_FEATURE_CACHE] = features
        state[_VIDEO_FRAME_INDICES] = indices
        return state

    def _new_state(self, images: torch.Tensor | None, num_frames: int, video_size: tuple[int, int],
                   offload_video_to_cpu: bool, offload_state_to_cpu: bool) -> dict[str, Any]:
        """The inference-state dictionary of the stock ``init_state``, with the same keys and meanings."""
        device = self.device
        return {
            "images": images,
            "num_frames": num_frames,
            "offload_video_to_cpu": offload_video_to_cpu,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": video_size[0],
            "video_width": video_size[1],
            "device": device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    def _get_image_feature(self, inference_state: dict[str, Any], frame_idx: int, batch_size: int):
        features = inference_state.get(_FEATURE_CACHE)
        if features is not None:
            # Serve the video-level cache through the stock one-frame lookup, so that expanding and flattening
            # the features stays stock code (SPEC §8.10).
            video_frame_index = inference_state[_VIDEO_FRAME_INDICES][frame_idx]
            inference_state["cached_features"] = {frame_idx: (_NO_IMAGE, features.backbone_out(video_frame_index))}
        return super()._get_image_feature(inference_state, frame_idx, batch_size)

    # ---- B2: the IoU prediction of a point prompt --------------------------------------------------------------

    def add_new_points_with_iou(self, inference_state: dict[str, Any], frame_idx: int, obj_id: int,
                                points: torch.Tensor, labels: torch.Tensor, normalize_coords: bool = True):
        """Stock ``add_new_points_or_box`` that also returns the predicted IoU of the kept mask (SPEC §8.2 B2).

        Returns ``(frame_idx, obj_ids, video_res_masks, best_iou)``; with one point on an initial conditioning
        frame the decoder predicts three masks and keeps the one with the highest IoU prediction, so
        ``best_iou`` (a 0-d fp32 tensor) is the maximum of the three. Masks are unaffected.
        """
        self._captured_ious = []
        try:
            frame_idx, obj_ids, video_res_masks = self.add_new_points_or_box(
                inference_state, frame_idx, obj_id, points=points, labels=labels, normalize_coords=normalize_coords)
            (ious,) = self._captured_ious  # an add call runs the SAM decoder exactly once
        finally:
            self._captured_ious = None
        return frame_idx, obj_ids, video_res_masks, ious[0].max()

    def _track_step(self, *args: Any, **kwargs: Any):
        outputs = super()._track_step(*args, **kwargs)
        if self._captured_ious is not None:
            sam_outputs = outputs[1]
            self._captured_ious.append(sam_outputs[2])  # the decoder's IoU predictions, (B, num_masks)
        return outputs

    # ---- batches of objects (SPEC §8.4 steps 2 and 6–8, §8.8, §8.10) --------------------------------------------

    @torch.inference_mode()
    def decode_points(self, inference_state: dict[str, Any], frame_idx: int,
                      points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of N single positive points (relative (x, y), fp32) decoded as its own object, in one batch.

        The steps of the stock ``add_new_points_or_box`` for a fresh object on an initial conditioning frame,
        with the N objects as the batch: the coordinates times the image size, one SAM decoder call (multimask),
        hole filling, and the upsampling to video resolution of the consolidated output. Returns the video-res
        logits (N, H₀, W₀) and the predicted IoU of each kept mask (N,) as B2 defines it (SPEC §8.2, §8.4 step 2).
        The session's object structures are not used, so no reset is needed.
        """
        device = inference_state["device"]
        count = points.shape[0]
        point_inputs = {"point_coords": (points.float() * self.image_size)[:, None, :].to(device),
                        "point_labels": torch.ones(count, 1, dtype=torch.int32, device=device)}
        self._captured_ious = []
        try:
            out, _ = self._run_single_frame_inference(
                inference_state=inference_state, output_dict=_new_output_dict(), frame_idx=frame_idx,
                batch_size=count, is_init_cond_frame=True, point_inputs=point_inputs, mask_inputs=None,
                reverse=False, run_mem_encoder=False)
            (ious,) = self._captured_ious
        finally:
            self._captured_ious = None
        return self._video_res(inference_state, out["pred_masks"])[:, 0], ious.max(dim=1).values

    @torch.inference_mode()
    def track_masks(self, inference_state: dict[str, Any], frame_idx: int,
                    masks: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """N mask prompts on one frame, tracked as a batch of N objects: yields (frame, logits (N, H₀, W₀)).

        The steps of the stock ``add_new_mask`` (resize to S², ≥ 0.5, the mask-as-output path) and of the memory
        encoding in ``propagate_in_video_preflight``, then forward propagation from ``frame_idx`` to the last frame
        and, in the same memory bank without reset, backward propagation from ``frame_idx − 1`` to frame 0
        (SPEC §8.4 steps 6–8, §8.8; B3). The objects share their prompt frame and so every memory selection; they
        never interact (``non_overlap_masks`` is off, §8.10).
        """
        device = inference_state["device"]
        mask_inputs = masks[:, None].float().to(device)
        if mask_inputs.shape[-2:] != (self.image_size, self.image_size):
            mask_inputs = F.interpolate(mask_inputs, size=(self.image_size, self.image_size), align_corners=False,
                                        mode="bilinear", antialias=True)
            mask_inputs = (mask_inputs >= 0.5).float()
        count = masks.shape[0]
        output_dict = _new_output_dict()
        prompt_out, _ = self._run_single_frame_inference(
            inference_state=inference_state, output_dict=output_dict, frame_idx=frame_idx, batch_size=count,
            is_init_cond_frame=True, point_inputs=None, mask_inputs=mask_inputs, reverse=False,
            run_mem_encoder=False)
        high_res_masks = F.interpolate(prompt_out["pred_masks"].to(device), size=(self.image_size, self.image_size),
                                       mode="bilinear", align_corners=False)
        prompt_out["maskmem_features"], prompt_out["maskmem_pos_enc"] = self._run_memory_encoder(
            inference_state=inference_state, frame_idx=frame_idx, batch_size=count, high_res_masks=high_res_masks,
            object_score_logits=prompt_out["object_score_logits"], is_mask_from_pts=True)
        output_dict["cond_frame_outputs"][frame_idx] = prompt_out
        num_frames = inference_state["num_frames"]
        for reverse, order in ((False, range(frame_idx, num_frames)), (True, range(frame_idx - 1, -1, -1))):
            for index in order:
                if index == frame_idx:
                    pred_masks = prompt_out["pred_masks"].to(device, non_blocking=True)
                else:
                    current_out, pred_masks = self._run_single_frame_inference(
                        inference_state=inference_state, output_dict=output_dict, frame_idx=index,
                        batch_size=count, is_init_cond_frame=False, point_inputs=None, mask_inputs=None,
                        reverse=reverse, run_mem_encoder=True)
                    output_dict["non_cond_frame_outputs"][index] = current_out
                self.tracking_steps += 1
                yield index, self._get_orig_video_res_output(inference_state, pred_masks)[1][:, 0]

    def _video_res(self, inference_state: dict[str, Any], low_res_masks: torch.Tensor) -> torch.Tensor:
        """Low-res logits at video resolution as the stock consolidation at video resolution computes them."""
        size = (inference_state["video_height"], inference_state["video_width"])
        if low_res_masks.shape[-2:] != size:
            low_res_masks = F.interpolate(low_res_masks, size=size, mode="bilinear", align_corners=False)
        return self._get_orig_video_res_output(inference_state, low_res_masks)[1]

    # ---- B3 and B4: propagation ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: dict[str, Any], start_frame_idx: int | None = None,
                           max_frame_num_to_track: int | None = None,
                           reverse: bool = False) -> Iterator[tuple[int, list[int], torch.Tensor]]:
        """Stock propagation, except that reverse propagation from frame 0 processes frame 0 (B3) and that no
        progress bar is shown (B4, SPEC §8.2). Every processed frame runs exactly the stock per-frame step.
        """
        self.propagate_in_video_preflight(inference_state)
        num_frames = inference_state["num_frames"]
        if start_frame_idx is None:  # stock default: the earliest frame with a prompt
            start_frame_idx = min(frame for outputs in inference_state["output_dict_per_obj"].values()
                                  for frame in outputs["cond_frame_outputs"])
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            # the stock predictor yields nothing when start_frame_idx == 0; range() includes frame 0 here
            end_frame_idx = max(start_frame_idx - max_frame_num_to_track, 0)
            processing_order = range(start_frame_idx, end_frame_idx - 1, -1)
        else:
            end_frame_idx = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            processing_order = range(start_frame_idx, end_frame_idx + 1)
        for frame_idx in processing_order:
            yield frame_idx, inference_state["obj_ids"], self._track_frame(inference_state, frame_idx, reverse)

    def _track_frame(self, inference_state: dict[str, Any], frame_idx: int, reverse: bool) -> torch.Tensor:
        """One step of the stock propagation loop for every object: (num_objects, 1, H₀, W₀) logits."""
        pred_masks_per_obj = []
        for obj_idx in range(self._get_obj_num(inference_state)):
            obj_output_dict = inference_state["output_dict_per_obj"][obj_idx]
            if frame_idx in obj_output_dict["cond_frame_outputs"]:
                # a prompted frame returns its (consolidated) conditioning output
                current_out = obj_output_dict["cond_frame_outputs"][frame_idx]
                pred_masks = current_out["pred_masks"].to(inference_state["device"], non_blocking=True)
            else:
                current_out, pred_masks = self._run_single_frame_inference(
                    inference_state=inference_state, output_dict=obj_output_dict, frame_idx=frame_idx,
                    batch_size=1, is_init_cond_frame=False, point_inputs=None, mask_inputs=None,
                    reverse=reverse, run_mem_encoder=True)
                obj_output_dict["non_cond_frame_outputs"][frame_idx] = current_out
            inference_state["frames_tracked_per_obj"][obj_idx][frame_idx] = {"reverse": reverse}
            pred_masks_per_obj.append(pred_masks)
        _, video_res_masks = self._get_orig_video_res_output(inference_state, torch.cat(pred_masks_per_obj, dim=0))
        return video_res_masks
