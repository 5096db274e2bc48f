"""Coarse-mask evaluator: J/F per expression over only the frames that have a PNG (SPEC §11.6).

    python evaluation/eval_rvos_obj_iou.py outputs/<MODEL>/F16_L14--1/inf-uniform-F16-attn-mask/davis_valid \\
        --dataset davis

Despite the reference's file name this is not an IoU evaluator. Results as for eval_rvos.py (SPEC §11.8).
"""
from __future__ import annotations

from typing import Sequence

from evaluation.evaluator import COARSE, evaluate
from model.utils.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    return evaluate(COARSE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_cli(main)
