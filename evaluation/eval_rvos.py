"""Dense-mask evaluator: J/F per expression over every meta frame, plus A/R on ReVOS (SPEC §11.4–§11.5).

    python evaluation/eval_rvos.py outputs/<MODEL>/F16_L14--1/inf-uniform-F16-sam-mask/davis_valid --dataset davis

Results: the prediction path with 'outputs' replaced by 'metrics', plus .json/.csv/.failures.json (SPEC §11.8).
"""
from __future__ import annotations

from typing import Sequence

from evaluation.evaluator import DENSE, evaluate
from model.utils.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    return evaluate(DENSE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_cli(main)
