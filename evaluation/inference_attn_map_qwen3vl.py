"""Stage 1 for Qwen3-VL (extension beyond the paper): one attention cache per (video, expression) (SPEC §3.4).

Example:
    python evaluation/inference_attn_map_qwen3vl.py --dataset davis --version ckpts/Qwen3-VL-8B-Instruct \
        --model_name qwen3-vl-8b-rvos --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import build_stage1_parser
from model.utils.errors import run_cli

FAMILY_FLAGS = ("attn_max_token", "attn_resize_scale", "attn_max_token_per_image")


def main(argv=None) -> int:
    args = build_stage1_parser(__doc__.splitlines()[0], FAMILY_FLAGS).parse_args(argv)
    # the model code (torch, transformers) loads only after parsing: --help and flag errors answer at once
    from model.adapters.qwen3_vl import Qwen3VLAdapter
    from model.stage1 import run_stage1

    return run_stage1(args, Qwen3VLAdapter, FAMILY_FLAGS)


if __name__ == "__main__":
    run_cli(main)
