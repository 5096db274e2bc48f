"""Stage 1 for InternVL3-hf: write one attention cache per (video, expression) (SPEC §1.1, §3.3).

Frame-level passes tile each frame into at most --max_patches 448-px tiles without the stock thumbnail tile.

Example:
    python evaluation/inference_attn_map_internvl.py --dataset davis --version ckpts/InternVL3-8B-hf \
        --model_name intern-vl-8b-rvos --max_patches 12 --attn_max_batch 4
"""
from __future__ import annotations

from model.parsers import run_stage1_script
from model.utils.errors import run_cli


def main(argv=None) -> int:
    return run_stage1_script("internvl", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
