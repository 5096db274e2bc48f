"""Stage 2: coarse attention masks and/or SAM2 masks from the attention caches (SPEC §1.1, §6–§8).

Example (Ref-DAVIS17, Qwen2.5-VL-7B caches from stage 1):
    python inference_attn_mask.py --dataset davis --version ckpts/Qwen2.5-VL-7B-Instruct \
        --model_name qwen2-5-vl-7b-rvos --predict_attn_mask --predict_sam_mask
"""
from __future__ import annotations

from model.parsers import build_mask_parser
from model.utils.errors import run_cli


def main(argv=None) -> int:
    args = build_mask_parser().parse_args(argv)
    from model.stage2 import run_masks

    return run_masks(args)


if __name__ == "__main__":
    run_cli(main)
