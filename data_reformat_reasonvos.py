"""Reformat ReasonVOS into meta_expressions_v2.json and mask_dict_v2.pkl (SPEC §10.4).

    python data_reformat_reasonvos.py --data_root datasets/RVOSJoint

Reads <data_root>/ReasonVOS/{meta_expressions.json, Annotations/, JPEGImages/} (VideoLISA's layout).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from evaluation.reasonvos_reformat import reformat
from model.jobs.benchmarks import default_data_root
from model.utils.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, default=None,
                        help="root holding ReasonVOS/ (default: $DECAF_DATA_ROOT or datasets/RVOSJoint)")
    args = parser.parse_args(argv)
    reformat(args.data_root if args.data_root is not None else default_data_root())
    return 0


if __name__ == "__main__":
    run_cli(main)
