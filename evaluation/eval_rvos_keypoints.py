"""Keypoint evaluator: point precision PP@{1,5,10,50,100} of keypoints.pt files (SPEC §9.3–§9.4).

    python evaluation/eval_rvos_keypoints.py outputs/<MODEL>/F16_L14--1/inf-uniform-F16-keypoint/davis_valid \\
        --dataset davis --offset 14

Results: <metrics path>_offset-<o>.json/.csv/.failures.json (SPEC §9.4, §12.4).
"""
from __future__ import annotations

from typing import Sequence

from evaluation.evaluator import KEYPOINTS, evaluate
from model.utils.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    return evaluate(KEYPOINTS, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_cli(main)
