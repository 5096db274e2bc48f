"""The argument parsers of the stage scripts (SPEC §13.2), in a module that imports nothing heavy.

The scripts parse their arguments before they import torch and the model code, so ``--help`` and a bad flag value
answer at once; the stage drivers (:mod:`model.stage1`, :mod:`model.stage2`) take the parsed arguments.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from model.cli_args import add_image_processor_arg, add_job_args, add_run_folder_args, batch_arg, positive_int
from model.adapters import FAMILIES
from model.settings import DEFAULT_SAM2_CHECKPOINT, DEFAULT_SAM2_CONFIG
from model.utils.paths import DEFAULT_THRESHOLD
from model.utils.paths import FUSION_MODES

# -------------------------------------------------------------------------------------------------- stage 1
FAMILY_FLAGS = {
    "attn_max_token": (int, 400, "Qwen families: merged tokens per video time slot; max_pixels = value·28² "
                                 "(·32² for Qwen3-VL) (SPEC §3.1)"),
    "attn_resize_scale": (int, 2, "Qwen families: frame-level images are s× the video frame size per side "
                                  "(SPEC §3.1)"),
    "attn_max_token_per_image": (int, -1, "Qwen families: if > 0, frame-level images keep their aspect ratio with "
                                          "max_pixels = value·28² (·32² for Qwen3-VL) instead of the s× rule"),
    "max_patches": (int, 12, "InternVL: maximum number of 448-px tiles per frame (SPEC §3.3)"),
}


def build_stage1_parser(description: str, family_flags: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_job_args(parser)
    add_run_folder_args(parser, version_required=True)
    group = parser.add_argument_group("extraction")
    group.add_argument("--attn_max_batch", type=batch_arg, default=4,
                       help="frame-level conversations per forward pass; only memory changes. 'auto' starts with "
                            "all frames and halves the chunk on CUDA out-of-memory (SPEC §5.6)")
    group.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                       help="MLLM weight and forward dtype (AWQ checkpoints force fp16); captured attention is "
                            "always fp32")
    group.add_argument("--attn_implementation", choices=("sdpa", "flash_attention_2"), default=None,
                       help="kernel of the model's own forward (default: flash_attention_2 if installed, else sdpa)")
    group.add_argument("--rollout_impl", choices=("streamed", "literal"), default="streamed",
                       help="'streamed' row-vector rollout (O(L·d) memory, SPEC §5.8a) or the paper-literal L×L "
                            "oracle (for tests and small inputs)")
    group.add_argument("--rollout_dtype", choices=("fp32", "bf16"), default="fp32",
                       help="precision of the captured attention and rollout; fp32 reproduces the paper, bf16 is "
                            "an opt-in extension (SPEC §5.5)")
    group.add_argument("--no_background", action="store_true",
                       help="ablation (Table 4a): skip calls 3-5 and write object maps only to a '_obj-only' folder")
    group.add_argument("--save_bg_captions", action="store_true",
                       help="also decode the background passes (calls 4-5) and store their captions")
    group.add_argument("--max_new_tokens", type=int, default=128,
                       help="greedy decoding length of the answers (SPEC §4.7: 128); lower it only for smoke tests "
                            "of random-weight models, it can change obj_name")
    group.add_argument("--no_prefix_cache", action="store_true",
                       help="compute every call of every expression from scratch instead of prefilling each visual "
                            "input's prefix (vision tower included) once per video (SPEC §5.8f); the maps are the "
                            "same, this is the reference path")
    group.add_argument("--family", choices=FAMILIES, default=None,
                       help="the model family the run must be (SPEC §13.2). The family is always read from the "
                            "checkpoint's config.json, never from its path (SPEC §14 #27); given, a checkpoint of "
                            "another family stops the run before the model loads")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_image_processor_arg(group)
    for name in family_flags:
        kind, default, text = FAMILY_FLAGS[name]
        group.add_argument(f"--{name}", type=kind, default=default, help=text)
    return parser



# -------------------------------------------------------------------------------------------------- stage 2
def add_fusion_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fusion (SPEC §6)")
    group.add_argument("--no_background", action="store_true",
                       help="ablation (Table 4a): fuse the object maps only; background maps of a full cache are "
                            "ignored, and an '_obj-only' cache is accepted. Outputs get the '_obj-only' suffix")
    group.add_argument("--fusion", choices=FUSION_MODES, default="both",
                       help="ablation (Table 4b): which levels enter Φ; 'video'/'frame' outputs get the "
                            "'_video-only'/'_frame-only' suffix")


def add_output_args(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("outputs")
    group.add_argument("--vis_save_path", default=None,
                       help=f"output folder of the {what} (default: outputs/<model_name>/F<N>_L<start>-<end>/"
                            f"inf-uniform-F<N>-<kind>/<data>)" + (
                                "; with both --predict_attn_mask and --predict_sam_mask each kind goes to its own "
                                "subfolder <vis_save_path>/<kind>" if what == "masks" else ""))
    group.add_argument("--use_saved_attn", action="store_true",
                       help="(accepted for compatibility; no effect) the reference's switch to read saved maps; "
                            "the cache is always read")
    group.add_argument("--save_overlay", action="store_true",
                       help="(accepted for compatibility; no effect)")


def stage2_parser(description: str) -> argparse.ArgumentParser:
    """The flags every reader of the attention caches takes: jobs, run folder, fusion."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_job_args(parser)
    add_run_folder_args(parser, version_required=False)
    add_fusion_args(parser)
    return parser


def build_mask_parser() -> argparse.ArgumentParser:
    """Flags of ``inference_attn_mask.py`` (SPEC §13.2, stage-2 subset)."""
    parser = stage2_parser("DecAF stage 2: fuse each job's attention cache into Φ and write coarse attention masks "
                           "(Otsu, SPEC §7) and/or SAM2 masks (SPEC §8) as PNGs.")
    group = parser.add_argument_group("masks")
    group.add_argument("--predict_attn_mask", action="store_true",
                       help="write coarse masks: one PNG per sampled frame into the 'attn-mask' folder")
    group.add_argument("--predict_sam_mask", action="store_true",
                       help="write SAM2 masks: one PNG per frame (all F) into the 'sam-mask' folder")
    group.add_argument("--point_threshold", type=float, default=DEFAULT_THRESHOLD,
                       help="τ_pq: cells with Φ ≥ this value become SAM2 point prompts (inclusive, SPEC §8.3)")
    group.add_argument("--final_score_threshold", type=float, default=DEFAULT_THRESHOLD,
                       help="τ_trk: tracklets with final score > this value are kept (strict, SPEC §8.7)")
    group.add_argument("--vision_pretrained", default=DEFAULT_SAM2_CHECKPOINT, help="SAM2 checkpoint file")
    group.add_argument("--vision_pretrained_config", default=DEFAULT_SAM2_CONFIG,
                       help="SAM2 config name (SAM 2.0 Hiera-L by default, SPEC §8.1)")
    group.add_argument("--sam2_overrides", nargs="*", default=[], metavar="OVERRIDE",
                       help="extra Hydra overrides for building SAM2 (not used by the paper; tests pass "
                            "'++model.image_size=256' to load a tiny checkpoint)")
    group.add_argument("--device", default=None, help="torch device for SAM2 (default: cuda if available, else cpu)")
    group.add_argument("--sam2_batch", type=positive_int, default=1, metavar="N",
                       help="SAM2 objects (candidate points, tracked masks) run as one batch, N at a time; 1 runs "
                            "each object alone, the per-object computation. Larger N is faster but not "
                            "bit-identical: batched kernels round differently, and a pixel on the mask boundary "
                            "can flip (docs/benchmarks.md)")
    add_output_args(parser, "masks")
    return parser


def build_keypoint_parser() -> argparse.ArgumentParser:
    """Flags of ``inference_keypoints.py`` (SPEC §9.1, §13.2)."""
    parser = stage2_parser("DecAF keypoints: fuse each job's attention cache into Φ and save its 100 highest cells "
                           "as keypoints.pt (SPEC §9.1–§9.2). Needs neither frames' pixels nor SAM2.")
    add_output_args(parser, "keypoints")
    return parser
