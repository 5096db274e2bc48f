"""Keypoints: the 100 highest cells of Φ per expression, saved as keypoints.pt (SPEC §1.4, §9.1–§9.2).

Example (the reference's keypoint run on Ref-DAVIS17):
    python inference_keypoints.py --dataset davis --model_name qwen2-5-vl-7b-rvos --attn_layer_idx_start 14
"""
from __future__ import annotations

from model.parsers import build_keypoint_parser
from model.utils.errors import run_cli


def main(argv=None) -> int:
    args = build_keypoint_parser().parse_args(argv)
    from model.stage2 import run_keypoints

    return run_keypoints(args)


if __name__ == "__main__":
    run_cli(main)
