"""Command-line flags shared by the stage-1, stage-2 and keypoint scripts (SPEC §13.2).

Reference flag names and the paper scripts' defaults are kept, so a user of the reference switches by changing
only the install step. Each group is added by one function, so every script explains a flag the same way.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from model.utils.errors import DecafError

DATASET_CHOICES = ("davis", "ytvos", "mevis", "revos", "reasonvos")


def layer_start_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from exc


def batch_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def prompt_version_arg(value: str) -> int:
    if value not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"prompt versions are 0, 1, 2 or 3, got {value!r}")
    return int(value)


def add_job_args(parser: argparse.ArgumentParser) -> None:
    """Dataset, job list, sharding and resumption (SPEC §10.1, §10.9)."""
    group = parser.add_argument_group("data and jobs")
    group.add_argument("--dataset", required=True, choices=DATASET_CHOICES,
                       help="benchmark to run (always explicit, never guessed from a path)")
    group.add_argument("--testset", action="store_true",
                       help="MeViS only: use the 'valid' split (server-scored) instead of 'valid_u'")
    group.add_argument("--data_root", default=None,
                       help="root of all benchmarks (default: $DECAF_DATA_ROOT or datasets/RVOSJoint)")
    group.add_argument("--subset_num", type=int, default=1,
                       help="number of shards the job list is split into (video i of the full job list goes to shard "
                            "i %% subset_num, with all its expressions); "
                            "taken from torchrun/Slurm (WORLD_SIZE/RANK, SLURM_NTASKS/SLURM_PROCID) when left at 1")
    group.add_argument("--subset_idx", type=int, default=0, help="which shard this process runs (0-based)")
    group.add_argument("--overwrite", action="store_true",
                       help="recompute jobs whose outputs exist (also replaces caches made with other settings)")
    group.add_argument("--fail_fast", action="store_true",
                       help="stop at the first failed job (default: log it, go on, exit non-zero at the end)")


def add_run_folder_args(parser: argparse.ArgumentParser, *, version_required: bool) -> None:
    """Flags that name the attention-cache folder (SPEC §12.2) and the method's stage-1 settings."""
    group = parser.add_argument_group("model and attention settings")
    group.add_argument("--version", required=version_required, default=None,
                       help="MLLM checkpoint folder (e.g. ckpts/Qwen2.5-VL-7B-Instruct)"
                            + ("" if version_required else "; only read to resolve --attn_layer_idx_start auto"))
    group.add_argument("--model_name", default=None,
                       help="name used in output paths (default: base name of --version), e.g. qwen2-5-vl-7b-rvos")
    group.add_argument("--num_input_frames", type=int, default=16, help="N, frames sampled per video (SPEC §2.3)")
    group.add_argument("--attn_layer_idx_start", type=layer_start_arg, default="auto",
                       help="first rollout layer, inclusive; 'auto' = half the LLM depth (SPEC §5.1)")
    group.add_argument("--attn_layer_idx_end", type=int, default=-1,
                       help="rollout end layer, exclusive; <= 0 means the last layer (SPEC §5.1)")
    group.add_argument("--prompt_obj_ver", type=prompt_version_arg, default=0,
                       help="object-class prompt version 0-3 (paper Table 10; SPEC §4.3)")
    group.add_argument("--prompt_bg_ver", type=prompt_version_arg, default=0,
                       help="background prompt version 0-3 (paper Table 11)")
    group.add_argument("--prompt_obj_cnt_ver", type=prompt_version_arg, default=0,
                       help="object-choice prompt version 0-3 (paper Table 12)")
    group.add_argument("--attn_save_path", default=None,
                       help="attention-cache folder (default: attn_weights/<model_name>/F<N>_L<start>-<end>/<data>)")


def add_image_processor_arg(group: argparse._ActionsContainer) -> None:
    """``--image_processor slow|fast``: which transformers backend preprocesses the frame-level images."""
    group.add_argument("--image_processor", choices=("slow", "fast"), default=None,
                       help="image processor backend: 'slow' = PIL, 'fast' = torchvision (may differ at float "
                            "rounding). Default: the paper reference's, i.e. slow for Qwen2/2.5-VL (SPEC §3.1) and "
                            "LLaVA-OV (SPEC §3.2), fast for InternVL3-hf and Qwen3-VL; recorded in the cache")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_name_of(args: argparse.Namespace) -> str:
    """``--model_name``, or the base name of ``--version`` (robust to a trailing slash)."""
    if args.model_name:
        return args.model_name
    if not args.version:
        raise DecafError("give --model_name (or --version, whose base name is the default)")
    return Path(os.path.normpath(args.version)).name
