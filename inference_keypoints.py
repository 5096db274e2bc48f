"""Keypoints: the 100 highest cells of Φ per expression, saved as keypoints.pt (SPEC §1.4, §9.1–§9.2).

Example (the reference's keypoint run on Ref-DAVIS17):
    python inference_keypoints.py --dataset davis --model_name qwen2-5-vl-7b-rvos --attn_layer_idx_start 14
"""
from __future__ import annotations

from model.errors import run_cli
from model.stage2 import keypoint_main


def main(argv=None) -> int:
    return keypoint_main(argv)


if __name__ == "__main__":
    run_cli(main)
