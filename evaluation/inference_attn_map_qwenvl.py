"""Stage 1 for Qwen2-VL and Qwen2.5-VL: write one attention cache per (video, expression) (SPEC §1.1, §3.1).

Example:
    python evaluation/inference_attn_map_qwenvl.py --dataset davis --version ckpts/Qwen2.5-VL-7B-Instruct \
        --model_name qwen2-5-vl-7b-rvos --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import build_stage1_parser
from model.utils.errors import run_cli

FAMILY_FLAGS = ("attn_max_token", "attn_resize_scale", "attn_max_token_per_image")


def main(argv=None) -> int:
    args = build_stage1_parser(__doc__.splitlines()[0], FAMILY_FLAGS).parse_args(argv)
    # the model code (torch, transformers) loads only after parsing: --help and flag errors answer at once
    from model.adapters.qwen import QwenVLAdapter
    from model.stage1 import run_stage1

    return run_stage1(args, QwenVLAdapter, FAMILY_FLAGS)


if __name__ == "__main__":
    run_cli(main)
