"""Stage 1 for LLaVA-OneVision: write one attention cache per (video, expression) (SPEC §1.1, §3.2).

The reference's input layout (no newline token or embedding, no base image in the frame passes) is built by the
adapter; LLaVA-OV has no family flags.

Example:
    python evaluation/inference_attn_map_llavaov.py --dataset davis --version ckpts/llava-onevision-qwen2-7b-ov-hf \
        --model_name llava-ov-7b-rvos --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import run_stage1_script
from model.utils.errors import run_cli


def main(argv=None) -> int:
    return run_stage1_script("llava_onevision", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
