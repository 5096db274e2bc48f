"""Zip Ref-YouTube-VOS or MeViS (valid) predictions for the evaluation server (SPEC §11.10).

    python evaluation/zip_refvos_results.py outputs/<MODEL>/.../mevis_valid submission.zip --dataset mevis
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from evaluation.submission import ZIP_PREFIX, make_submission_zip
from model.utils.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pred_dir", type=Path, help="prediction folder holding <video>/<exp_id>/<frame>.png")
    parser.add_argument("out_zip", type=Path, help="zip file to write (replaced atomically if it exists)")
    parser.add_argument("--dataset", required=True, choices=sorted(ZIP_PREFIX),
                        help="server layout: ytvos = Annotations/<video>/<exp_id>/<frame>.png, "
                             "mevis = <video>/<exp_id>/<frame>.png at the zip root")
    args = parser.parse_args(argv)
    counts = make_submission_zip(args.pred_dir, args.out_zip, args.dataset)
    print(f"wrote {args.out_zip}: {counts['videos']} videos, {counts['expressions']} expressions, "
          f"{counts['files']} PNGs")
    return 0


if __name__ == "__main__":
    run_cli(main)
