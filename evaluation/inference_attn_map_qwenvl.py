"""Stage 1 for Qwen2-VL and Qwen2.5-VL: write one attention cache per (video, expression) (SPEC §1.1, §3.1).

Example:
    python evaluation/inference_attn_map_qwenvl.py --dataset davis --version ckpts/Qwen2.5-VL-7B-Instruct \
        --model_name qwen2-5-vl-7b-rvos --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import run_stage1_script
from model.utils.errors import run_cli


def main(argv=None) -> int:
    return run_stage1_script("qwen", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
