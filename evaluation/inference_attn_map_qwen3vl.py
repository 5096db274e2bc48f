"""Stage 1 for Qwen3-VL (extension beyond the paper): one attention cache per (video, expression) (SPEC §3.4).

Example:
    python evaluation/inference_attn_map_qwen3vl.py --dataset davis --version ckpts/Qwen3-VL-8B-Instruct \
        --model_name qwen3-vl-8b-rvos --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import run_stage1_script
from model.utils.errors import run_cli


def main(argv=None) -> int:
    return run_stage1_script("qwen3_vl", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
