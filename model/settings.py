"""Every run setting once: its flag, default, type, help text, SPEC section and group (SPEC §13.2).

The parsers of the stage scripts (:mod:`model.parsers`), of ``demo.py`` and of the web demo are built from
:data:`SETTINGS` with :func:`add_settings`, and the Python API's :class:`SegmentSettings` takes its defaults from it,
so a default or a help text exists in one place. Defaults that a library module below needs as well are defined
there, in a module that imports nothing heavy, and read here: the family input options on
:class:`~model.adapters.options.AdapterOptions`, the answer length and prompt versions in
:mod:`model.attention.prompts`, the SAM2 checkpoint and batch in :mod:`model.sam`, the thresholds and fusion modes
in :mod:`model.utils.paths`.

This module imports nothing heavy, so that every script answers ``--help`` and a bad flag value before torch loads.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from model.adapters import FAMILIES
from model.adapters.options import AdapterOptions
from model.attention import DEFAULT_ATTN_MAX_BATCH, DEFAULT_ROLLOUT_IMPL
from model.attention.prompts import MAX_NEW_TOKENS, PROMPT_VERSIONS, check_version
from model.sam import DEFAULT_SAM2_BATCH, DEFAULT_SAM2_CHECKPOINT, DEFAULT_SAM2_CONFIG
from model.selftest.tiny.preset import DEFAULT_TINY_CKPTS, DISCLAIMER, TINY_PRECISION, TINY_SETTINGS
from model.utils.errors import DecafError, SettingError
from model.utils.paths import DEFAULT_THRESHOLD, FUSION_MODES

DEFAULT_MLLM = "ckpts/Qwen2.5-VL-7B-Instruct"
DATASET_CHOICES = ("davis", "ytvos", "mevis", "revos", "reasonvos")
#: --attn_max_batch of the benchmark scripts (SPEC §13.4) and of a live run (demo, API: one video, more memory free)
SCRIPT_ATTN_MAX_BATCH, LIVE_ATTN_MAX_BATCH = DEFAULT_ATTN_MAX_BATCH, 8

# ------------------------------------------------------------------------------------------------ value types
def layer_start_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from exc


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def batch_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def prompt_version_arg(value: str) -> int:
    if value not in tuple(str(v) for v in PROMPT_VERSIONS):
        raise argparse.ArgumentTypeError(f"prompt versions are 0, 1, 2 or 3, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------- registry
#: group key → section title in --help, in the order the sections appear
GROUPS = {
    "input": "input (one video)",
    "data": "data and jobs (SPEC §10)",
    "model": "models (SPEC §3, §8.1)",
    "capture": "attention: prompts, capture and rollout (stage 1, SPEC §4–§5)",
    "fusion": "fusion (SPEC §6)",
    "sam2": "SAM2 prompting (SPEC §8)",
    "outputs": "outputs (SPEC §12)",
    "web": "web demo",
    "tiny": "trying it offline",
}

#: how a setting is spelled on the command line
VALUE, SWITCH, TOGGLE, LIST = "value", "switch", "toggle", "list"


@dataclass(frozen=True)
class Setting:
    """One run setting and its flag ``--<name>``."""

    name: str
    group: str  # a key of GROUPS
    help: str  # says what it does, and which SPEC section defines it
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    kind: str = VALUE  # VALUE (--x V), SWITCH (--x), TOGGLE (--x / --no-x), LIST (--x A B ...)
    required: bool = False
    metavar: str | None = None

    def __post_init__(self) -> None:
        if self.kind == SWITCH:  # a switch is off unless given
            object.__setattr__(self, "default", False)

    def add_to(self, container: argparse._ActionsContainer, **changes: Any) -> None:
        """Add the flag to a parser or group; ``changes`` replace ``default``, ``required`` or ``help`` for one
        script (e.g. ``--version`` is required by stage 1 only)."""
        default = changes.get("default", self.default)
        text = changes.get("help", self.help)
        flag = f"--{self.name}"
        if self.kind == SWITCH:
            container.add_argument(flag, action="store_true", help=text)
        elif self.kind == TOGGLE:
            container.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            extra: dict[str, Any] = {"nargs": "*"} if self.kind == LIST else {}
            for key in ("type", "choices", "metavar"):
                if getattr(self, key) is not None:
                    extra[key] = getattr(self, key)
            container.add_argument(flag, default=list(default) if self.kind == LIST else default,
                                   required=changes.get("required", self.required), help=text, **extra)


def _family_option(name: str) -> Setting:
    default, text = AdapterOptions.describe(name)
    return Setting(name, "capture", text, default, int)


_SETTINGS = (
    # --- one video (demo.py, the web demo, the API)
    Setting("video_path", "input", "a folder of .jpg frames (sorted by name) or a video file (MP4 etc., decoded "
            "with OpenCV)", required=True),
    Setting("exp", "input", "the referring expression or question; surrounding whitespace is stripped, and '.' is "
            "appended unless it ends with '?' or '.' (SPEC §2.1)", required=True),
    # --- a benchmark's jobs (SPEC §10)
    Setting("dataset", "data", "benchmark to run (always explicit, never guessed from a path)",
            choices=DATASET_CHOICES, required=True),
    Setting("testset", "data", "MeViS only: use the 'valid' split (server-scored) instead of 'valid_u'",
            kind=SWITCH),
    Setting("data_root", "data", "root of all benchmarks (default: $DECAF_DATA_ROOT or datasets/RVOSJoint)"),
    Setting("subset_num", "data", "number of shards the job list is split into (video i of the full job list goes "
            "to shard i %% subset_num, with all its expressions); taken from torchrun/Slurm (WORLD_SIZE/RANK, "
            "SLURM_NTASKS/SLURM_PROCID) when left at 1", 1, int),
    Setting("subset_idx", "data", "which shard this process runs (0-based)", 0, int),
    Setting("overwrite", "data", "recompute jobs whose outputs exist (also replaces caches made with other "
            "settings)", kind=SWITCH),
    Setting("fail_fast", "data", "stop at the first failed job (default: log it, go on, exit non-zero at the end)",
            kind=SWITCH),
    # --- models
    Setting("version", "model", "MLLM checkpoint folder of any supported family, e.g. "
            f"{DEFAULT_MLLM}; the family is read from its config.json (see ckpts/README.md)"),
    Setting("model_name", "model", "name used in output paths (default: base name of --version), e.g. "
            "qwen2-5-vl-7b-rvos"),
    Setting("family", "model", "the model family the run must be (SPEC §13.2). The family is always read from the "
            "checkpoint's config.json, never from its path (SPEC §14 #27); given, a checkpoint of another family "
            "stops the run before the model loads", choices=FAMILIES),
    Setting("precision", "model", "MLLM weight and forward dtype (AWQ checkpoints force fp16); captured attention "
            "is always fp32 and SAM2 always runs in fp32", "bf16", choices=("bf16", "fp16", "fp32")),
    Setting("attn_implementation", "model", "kernel of the MLLM's own forward (default: flash_attention_2 if "
            "installed, else sdpa)", choices=("sdpa", "flash_attention_2")),
    Setting("image_processor", "model", "image processor backend: 'slow' = PIL, 'fast' = torchvision (may differ at "
            "float rounding). Default: the paper reference's, i.e. slow for Qwen2/2.5-VL (SPEC §3.1) and LLaVA-OV "
            "(SPEC §3.2), fast for InternVL3-hf and Qwen3-VL; recorded in the cache", choices=("slow", "fast")),
    Setting("vision_pretrained", "model", "SAM2 checkpoint file", DEFAULT_SAM2_CHECKPOINT),
    Setting("vision_pretrained_config", "model", "SAM2 config name (SAM 2.0 Hiera-L by default, SPEC §8.1)",
            DEFAULT_SAM2_CONFIG),
    Setting("sam2_overrides", "model", "extra Hydra overrides for building SAM2 (not used by the paper; tests pass "
            "'++model.image_size=256' to load a tiny checkpoint)", (), kind=LIST, metavar="OVERRIDE"),
    Setting("device", "model", "torch device of the models (default: cuda if available, else cpu)"),
    # --- stage 1: prompts, capture, rollout
    Setting("num_input_frames", "capture", "N, frames sampled uniformly per video for the MLLM (SPEC §2.3)", 16,
            int),
    Setting("attn_layer_idx_start", "capture", "first rollout layer, inclusive; 'auto' = half the LLM depth "
            "(SPEC §5.1)", "auto", layer_start_arg),
    Setting("attn_layer_idx_end", "capture", "rollout end layer, exclusive; <= 0 means the last layer (SPEC §5.1)",
            -1, int),
    *(_family_option(name) for name in AdapterOptions.names()),
    Setting("attn_max_batch", "capture", "frame-level conversations per forward pass; only memory changes. 'auto' "
            "starts with all frames and halves the chunk on CUDA out-of-memory (SPEC §5.6)", SCRIPT_ATTN_MAX_BATCH,
            batch_arg),
    Setting("prompt_obj_ver", "capture", "object-class prompt version 0-3 (paper Table 10; SPEC §4.3)", 0,
            prompt_version_arg),
    Setting("prompt_bg_ver", "capture", "background prompt version 0-3 (paper Table 11; SPEC §4.3)", 0,
            prompt_version_arg),
    Setting("prompt_obj_cnt_ver", "capture", "object-choice prompt version 0-3 (paper Table 12; SPEC §4.3)", 0,
            prompt_version_arg),
    Setting("max_new_tokens", "capture", f"greedy decoding length of the answers (SPEC §4.7: {MAX_NEW_TOKENS}); "
            "lower it only for smoke tests of random-weight models, it can change obj_name", MAX_NEW_TOKENS, int),
    Setting("rollout_impl", "capture", "'streamed' row-vector rollout (O(L·d) memory, SPEC §5.8a) or the "
            "paper-literal L×L oracle (for tests and small inputs)", DEFAULT_ROLLOUT_IMPL, choices=("streamed", "literal")),
    Setting("rollout_dtype", "capture", "precision of the captured attention and rollout; fp32 reproduces the "
            "paper, bf16 is an opt-in extension (SPEC §5.5)", "fp32", choices=("fp32", "bf16")),
    Setting("no_prefix_cache", "capture", "compute every call of every expression from scratch instead of "
            "prefilling each visual input's prefix (vision tower included) once per video (SPEC §5.8f); the maps "
            "are the same, this is the reference path", kind=SWITCH),
    Setting("save_bg_captions", "capture", "also decode the background passes (calls 4-5) and store their "
            "captions", kind=SWITCH),
    # --- fusion
    Setting("no_background", "fusion", "ablation (Table 4a, SPEC §6.7): object maps only. Stage 1 skips calls 3-5 "
            "and writes an '_obj-only' cache; stage 2 fuses the object maps only (the background maps of a full "
            "cache are ignored, an '_obj-only' cache is accepted) and its outputs get the '_obj-only' suffix",
            kind=SWITCH),
    Setting("fusion", "fusion", "ablation (Table 4b, SPEC §6.7): which levels enter Φ; 'video'/'frame' outputs get "
            "the '_video-only'/'_frame-only' suffix", "both", choices=FUSION_MODES),
    # --- SAM2 prompting
    Setting("point_threshold", "sam2", "τ_pq: cells of the fused map with Φ >= this value become SAM2 point "
            "prompts (inclusive, SPEC §8.3)", DEFAULT_THRESHOLD, float),
    Setting("final_score_threshold", "sam2", "τ_trk: tracklets whose final score is > this value are kept and "
            "prompt the whole video (strict, SPEC §8.7)", DEFAULT_THRESHOLD, float),
    Setting("sam2_batch", "sam2", "SAM2 objects (candidate points, tracked masks) run as one batch, N at a time; 1 "
            "runs each object alone, the per-object computation. Larger N is faster but not bit-identical: batched "
            "kernels round differently, and a pixel on the mask boundary can flip (docs/benchmarks.md)",
            DEFAULT_SAM2_BATCH, positive_int, metavar="N"),
    # --- outputs
    Setting("attn_save_path", "outputs", "attention-cache folder (default: attn_weights/<model_name>/"
            "F<N>_L<start>-<end>/<data>, SPEC §12.2)"),
    Setting("vis_save_path", "outputs", "output folder (default: outputs/<model_name>/F<N>_L<start>-<end>/"
            "inf-uniform-F<N>-<kind>/<data>, SPEC §12.3)"),
    Setting("predict_attn_mask", "outputs", "write coarse masks (SPEC §7): one PNG per sampled frame into the "
            "'attn-mask' folder", kind=SWITCH),
    Setting("predict_sam_mask", "outputs", "write SAM2 masks (SPEC §8): one PNG per frame (all F) into the "
            "'sam-mask' folder", kind=SWITCH),
    Setting("use_saved_attn", "outputs", "(accepted for compatibility; no effect) the reference's switch to read "
            "saved maps; the cache is always read", kind=SWITCH),
    Setting("save_overlay", "outputs", "(accepted for compatibility; no effect)", kind=SWITCH),
    Setting("save_per_frame", "outputs", "also write half-size per-frame images to <vis_save_path>/<video name>/"
            "{img, attn_map, coarse_mask, points} (sampled frames) and sam_mask (every frame)", kind=SWITCH),
    Setting("save_video", "outputs", "also write <vis_save_path>/<video name>_sam_mask.mp4: every frame with its "
            "SAM2 mask, at the source frame rate of a video file, else 10 fps", kind=SWITCH),
    Setting("save_masks", "outputs", "write the SAM2 mask of every frame as a 0/255 PNG to <vis_save_path>/"
            "<video name>/masks/", True, kind=TOGGLE),
    # --- the web demo
    Setting("web", "web", "start the interactive web demo (Gradio, pip install -e \".[web]\") on a local port "
            "instead; it takes the model and method flags, see python -m model.webdemo --help", kind=SWITCH),
    Setting("host", "web", "address to listen on; 127.0.0.1 keeps the page to this machine", "127.0.0.1"),
    Setting("port", "web", "port to listen on", 7860, int),
    Setting("max_frames", "web", "longest clip accepted, in frames; longer ones are refused with a message "
            "(memory)", 400, int),
    # --- offline preset
    Setting("tiny", "tiny", "use tiny random-weight checkpoints of the real classes (built into --tiny_ckpts on "
            "first use) with settings that finish in about a minute on a CPU: "
            f"{TINY_SETTINGS}, --precision {TINY_PRECISION}. Flags given explicitly still win. {DISCLAIMER}",
            kind=SWITCH),
    Setting("tiny_ckpts", "tiny", "folder of the tiny checkpoints for --tiny (written by `python -m model.selftest "
            "--make_ckpts DIR`, or on first use)", str(DEFAULT_TINY_CKPTS)),
)
#: every run setting by name
SETTINGS: dict[str, Setting] = {setting.name: setting for setting in _SETTINGS}


def add_settings(parser: argparse.ArgumentParser, names: Sequence[str],
                 changes: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add the flags ``names`` to ``parser``, one argument group per registry group in the order of
    :data:`GROUPS`; ``changes[name]`` replaces that flag's ``default``, ``required`` or ``help`` for this script."""
    changes = changes or {}
    unknown = sorted(set(names) - set(SETTINGS)) + sorted(set(changes) - set(names))
    if unknown:
        raise KeyError(f"not run settings of this parser: {unknown}")
    for group_key, title in GROUPS.items():
        members = [SETTINGS[name] for name in names if SETTINGS[name].group == group_key]
        if members:
            group = parser.add_argument_group(title)
            for setting in members:
                setting.add_to(group, **changes.get(setting.name, {}))


def default_of(name: str) -> Any:
    return SETTINGS[name].default


# ----------------------------------------------------------------------------------------- a live run's settings
def _live(name: str, default: Any = None) -> Any:
    return field(default=default_of(name) if default is None else default)


@dataclass(frozen=True)
class SegmentSettings:
    """Method settings of a live run (the demo, the web demo, the Python API; SPEC §1.5, §13.2, §13.3), with the
    registry's defaults. The same checks as the flags' types apply, as errors that name the setting."""

    num_input_frames: int = _live("num_input_frames")
    attn_layer_idx_start: int | str = _live("attn_layer_idx_start")
    attn_layer_idx_end: int = _live("attn_layer_idx_end")
    attn_max_token: int = _live("attn_max_token")
    attn_resize_scale: int = _live("attn_resize_scale")
    attn_max_token_per_image: int = _live("attn_max_token_per_image")
    max_patches: int = _live("max_patches")
    attn_max_batch: int | str = _live("attn_max_batch", LIVE_ATTN_MAX_BATCH)
    prompt_obj_ver: int = _live("prompt_obj_ver")
    prompt_bg_ver: int = _live("prompt_bg_ver")
    prompt_obj_cnt_ver: int = _live("prompt_obj_cnt_ver")
    max_new_tokens: int = _live("max_new_tokens")
    point_threshold: float = _live("point_threshold")
    final_score_threshold: float = _live("final_score_threshold")
    sam2_batch: int = _live("sam2_batch")

    def __post_init__(self) -> None:
        if self.num_input_frames < 1:
            raise SettingError("num_input_frames", f"must be positive, got {self.num_input_frames}")
        if self.attn_max_batch != "auto" and (not isinstance(self.attn_max_batch, int) or self.attn_max_batch < 1):
            raise SettingError("attn_max_batch", f"must be a positive integer or 'auto', got {self.attn_max_batch!r}")
        if self.attn_layer_idx_start != "auto" and not isinstance(self.attn_layer_idx_start, int):
            raise SettingError("attn_layer_idx_start",
                               f"must be an integer or 'auto', got {self.attn_layer_idx_start!r}")
        if not isinstance(self.sam2_batch, int) or self.sam2_batch < 1:
            raise SettingError("sam2_batch", f"must be a positive integer, got {self.sam2_batch!r}")
        if self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        for name in ("prompt_obj_ver", "prompt_bg_ver", "prompt_obj_cnt_ver"):
            check_version(name, getattr(self, name))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SegmentSettings:
        """The settings of parsed flags (every field is a flag of the same name)."""
        return cls(**{name: getattr(args, name) for name in cls.field_names()})

    def adapter_options(self) -> AdapterOptions:
        return AdapterOptions(**{name: getattr(self, name) for name in AdapterOptions.names()})


# ------------------------------------------------------------------------------------------------ shared helpers
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_name_of(model_name: str | None, version: str | None) -> str:
    """``--model_name``, or the base name of ``--version`` (robust to a trailing slash)."""
    if model_name:
        return model_name
    if not version:
        raise DecafError("give --model_name (or --version, whose base name is the default)")
    return Path(os.path.normpath(version)).name
