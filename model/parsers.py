"""The argument parsers of the stage scripts (SPEC §13.2), built from the settings registry (:mod:`model.settings`).

Each parser is a list of setting names: the flags, defaults and help texts come from the registry, and a family's
input flags from :class:`~model.adapters.options.AdapterOptions` (which families read which option). Nothing heavy
is imported: the scripts parse their arguments before torch and the model code load, so ``--help`` and a bad flag
value answer at once; the stage drivers (:mod:`model.stage1`, :mod:`model.stage2`) take the parsed arguments.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from model.adapters import families_in
from model.adapters.options import AdapterOptions
from model.settings import add_settings

#: flags of every benchmark command: the jobs and their shard (SPEC §10.1, §10.9)
JOB_FLAGS = ("dataset", "testset", "data_root", "subset_num", "subset_idx", "overwrite", "fail_fast")
#: flags that name the attention-cache folder and the run folder (SPEC §12.2)
RUN_FOLDER_FLAGS = ("version", "model_name", "num_input_frames", "attn_layer_idx_start", "attn_layer_idx_end",
                    "prompt_obj_ver", "prompt_bg_ver", "prompt_obj_cnt_ver", "attn_save_path")
STAGE1_FLAGS = (*JOB_FLAGS, *RUN_FOLDER_FLAGS, "family", "precision", "attn_implementation", "image_processor",
                "device", "attn_max_batch", "max_new_tokens", "rollout_impl", "rollout_dtype", "no_prefix_cache",
                "save_bg_captions", "no_background")
#: flags of every reader of the attention caches: jobs, run folder, fusion (SPEC §6)
STAGE2_FLAGS = (*JOB_FLAGS, *RUN_FOLDER_FLAGS, "no_background", "fusion", "vis_save_path", "use_saved_attn",
                "save_overlay")
MASK_FLAGS = (*STAGE2_FLAGS, "predict_attn_mask", "predict_sam_mask", "point_threshold", "final_score_threshold",
              "vision_pretrained", "vision_pretrained_config", "sam2_overrides", "device", "sam2_batch")
#: stage 2 needs --version only to resolve --attn_layer_idx_start auto
STAGE2_CHANGES = {"version": {"help": "MLLM checkpoint folder; only read to resolve --attn_layer_idx_start auto"}}


def _parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def family_flags(module: str) -> tuple[str, ...]:
    """The input flags of the families whose adapter lives in ``model/adapters/<module>.py`` (SPEC §13.2)."""
    return AdapterOptions.flags_for(families_in(module))


def build_stage1_parser(description: str, flags: Sequence[str]) -> argparse.ArgumentParser:
    """Flags of an ``evaluation/inference_attn_map_<family>.py`` script with that family's input ``flags``."""
    parser = _parser(description)
    add_settings(parser, (*STAGE1_FLAGS, *flags), {"version": {"required": True}})
    return parser


def run_stage1_script(module: str, docstring: str, argv: Sequence[str] | None) -> int:
    """An ``inference_attn_map_<family>.py`` script: parse, then load the family's adapter and run stage 1."""
    args = build_stage1_parser(docstring.splitlines()[0], family_flags(module)).parse_args(argv)
    # the model code (torch, transformers) loads only after parsing: --help and flag errors answer at once
    from model.adapters import adapter_in
    from model.stage1 import run_stage1

    return run_stage1(args, adapter_in(module))


def build_mask_parser() -> argparse.ArgumentParser:
    """Flags of ``inference_attn_mask.py`` (SPEC §13.2, stage-2 subset)."""
    parser = _parser("DecAF stage 2: fuse each job's attention cache into Φ and write coarse attention masks "
                     "(Otsu, SPEC §7) and/or SAM2 masks (SPEC §8) as PNGs.")
    add_settings(parser, MASK_FLAGS, {
        **STAGE2_CHANGES,
        "vis_save_path": {"help": "output folder of the masks (default: outputs/<model_name>/F<N>_L<start>-<end>/"
                                  "inf-uniform-F<N>-<kind>/<data>); with both --predict_attn_mask and "
                                  "--predict_sam_mask each kind goes to its own subfolder <vis_save_path>/<kind>"}})
    return parser


def build_keypoint_parser() -> argparse.ArgumentParser:
    """Flags of ``inference_keypoints.py`` (SPEC §9.1, §13.2)."""
    parser = _parser("DecAF keypoints: fuse each job's attention cache into Φ and save its 100 highest cells as "
                     "keypoints.pt (SPEC §9.1–§9.2). Needs neither frames' pixels nor SAM2.")
    add_settings(parser, STAGE2_FLAGS, STAGE2_CHANGES)
    return parser
