"""Stage 1 for LLaVA-OneVision: write one attention cache per (video, expression) (SPEC §1.1, §3.2).

The reference's input layout (no newline token or embedding, no base image in the frame passes) is built by the
adapter; LLaVA-OV has no family flags.

Example:
    python evaluation/inference_attn_map_llavaov.py --dataset davis --version ckpts/llava-onevision-qwen2-7b-ov-hf \
        --model_name llava-ov-7b-rvos --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import build_stage1_parser
from model.utils.errors import run_cli

FAMILY_FLAGS = ()


def main(argv=None) -> int:
    args = build_stage1_parser(__doc__.splitlines()[0], FAMILY_FLAGS).parse_args(argv)
    # the model code (torch, transformers) loads only after parsing: --help and flag errors answer at once
    from model.adapters.llava_onevision import LlavaOnevisionAdapter
    from model.stage1 import run_stage1

    return run_stage1(args, LlavaOnevisionAdapter, FAMILY_FLAGS)


if __name__ == "__main__":
    run_cli(main)
