"""Print the folders one run-script pipeline reads and writes, as shell assignments (SPEC §12.2–§12.4).

Used by ``evaluation/scripts/common.sh``, which passes every stage an explicit ``--attn_save_path`` /
``--vis_save_path`` and every evaluator the matching prediction folder. The names come from ``model.utils.paths``, the
same functions the Python stages use for their defaults (stage 1: ``model/stage1.py``; stage 2 and keypoints:
``model.stage2.resolve_layout``), so the scripts and the stages cannot drift apart. This helper receives the exact
argument lists the stages get and reads only the flags that name folders.

Usage (what common.sh runs):
    python evaluation/scripts/run_paths.py [--attn_root R] [--output_root O] [--results_root S] [--run_suffix X]
        [--threshold_grid] --stage1 <stage-1 arguments...> --stage2 <stage-2 arguments...>

Printed names: DATA_NAME, CACHE_RUN_FOLDER, RUN_FOLDER, ATTN_DIR, COARSE_DIR, SAM_DIR, KEYPOINT_DIR, ZIP_PATH, LOG_DIR.

With ``--check STEPS`` it first checks, once for the whole run and before any shard starts, what the selected steps
need: the benchmark's meta file and frame folder under the data root, the MLLM checkpoint (stage 1) and the SAM2
checkpoint (SAM step). A problem is one line on stderr and exit status 2, so that a configuration error is not
reported once per GPU shard.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from model.parsers import JOB_FLAGS, RUN_FOLDER_FLAGS
from model.settings import add_settings, model_name_of
from model.utils.errors import DecafError, run_cli
from model.utils.paths import cache_folder, data_name, output_kind, run_folder

STAGE_MARKERS = ("--stage1", "--stage2")


def stage_parser() -> argparse.ArgumentParser:
    """The folder-naming subset of the stage flags (SPEC §13.2); every other flag is ignored."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_settings(parser, (*JOB_FLAGS, *RUN_FOLDER_FLAGS, "no_background", "fusion", "point_threshold",
                          "final_score_threshold", "vis_save_path"))
    return parser


def helper_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Print the cache, output, zip and log folders of one run-script pipeline as shell "
                    "assignments (used by evaluation/scripts/common.sh). Stage arguments follow --stage1 and "
                    "--stage2.")
    parser.add_argument("--attn_root", default="attn_weights", help="root of the attention caches (SPEC §12.1)")
    parser.add_argument("--output_root", default="outputs",
                        help="root of the mask and keypoint outputs; metrics go to the same path with its "
                             "'outputs' component replaced by 'metrics' (SPEC §12.4)")
    parser.add_argument("--results_root", default="results", help="root of the server zips (SPEC §12.1)")
    parser.add_argument("--run_suffix", default="",
                        help="appended to the run folder F<N>_L<start>-<end>…, for ablations whose flags add no "
                             "suffix of their own (e.g. '_no-ms' for --attn_resize_scale 1)")
    parser.add_argument("--threshold_grid", action="store_true",
                        help="name the SAM folder with its thresholds even at 0.80/0.80 (threshold grid, §13.5)")
    parser.add_argument("--check", default=None, metavar="STEPS",
                        help="first check the inputs of these space-separated run-script steps (data root, meta "
                             "file, checkpoints) and exit 2 with one line if one is missing")
    parser.add_argument("--sam2_ckpt", default=None, help="SAM2 checkpoint the SAM step will load (for --check)")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(helper flags, stage-1 arguments, stage-2 arguments), split at the literal markers."""
    argv = list(argv)
    if any(argv.count(marker) != 1 for marker in STAGE_MARKERS) or argv.index("--stage1") > argv.index("--stage2"):
        raise DecafError("run_paths.py needs '--stage1 <args...> --stage2 <args...>', each marker once, in order")
    first, second = argv.index("--stage1"), argv.index("--stage2")
    return argv[:first], argv[first + 1:second], argv[second + 1:]


def resolved_start(args: argparse.Namespace) -> int:
    """The start layer in folder names: ``auto`` is read from the checkpoint's depth, as the stages do (§5.1)."""
    if args.attn_layer_idx_start != "auto":
        return args.attn_layer_idx_start
    if not args.version:
        raise DecafError("START_LAYER=auto needs VERSION (the checkpoint folder) to read the model depth")
    from model.adapters.base import layer_count, read_checkpoint_config, resolve_layer_range

    return resolve_layer_range(layer_count(read_checkpoint_config(args.version)), "auto",
                               args.attn_layer_idx_end)[0]


def check_inputs(steps: Sequence[str], stage1: argparse.Namespace, sam2_ckpt: str | None) -> None:
    """What the selected steps read must exist before any shard starts (SPEC §10.1, §13.2)."""
    from model.jobs.benchmarks import list_jobs

    if any(step in steps for step in ("attn", "coarse", "sam", "keypoints", "coarse_eval", "sam_eval",
                                      "keypoint_eval")):
        # reading the meta file names what is missing
        if not list_jobs(stage1.dataset, stage1.data_root, stage1.testset):
            raise DecafError(f"the {stage1.dataset} meta file under {stage1.data_root} lists no expression")
    if "attn" in steps:
        from model.adapters import adapter_for_checkpoint
        from model.adapters.base import check_checkpoint_files

        adapter_for_checkpoint(stage1.version)  # config.json present and a supported family
        check_checkpoint_files(stage1.version)
    if "sam" in steps and sam2_ckpt and not Path(sam2_ckpt).is_file():
        raise DecafError(f"SAM2 checkpoint not found: {sam2_ckpt}; set SAM2_CKPT or see ckpts/README.md")


def run_paths(argv: Sequence[str]) -> dict[str, str]:
    """The folders of one pipeline, keyed by the shell variable names common.sh uses."""
    own, stage1_argv, stage2_argv = split_argv(argv)
    opts = helper_parser().parse_args(own)
    stage1, _ = stage_parser().parse_known_args(stage1_argv)
    stage2, _ = stage_parser().parse_known_args(stage2_argv)
    if opts.check is not None:
        check_inputs(opts.check.split(), stage1, opts.sam2_ckpt)
    for flags in (stage1, stage2):
        if flags.attn_save_path or flags.vis_save_path:
            raise DecafError("the run scripts set --attn_save_path/--vis_save_path themselves; move the run with "
                             "ATTN_ROOT, OUTPUT_ROOT or RUN_SUFFIX instead")
    versions = (stage1.prompt_obj_ver, stage1.prompt_bg_ver, stage1.prompt_obj_cnt_ver)
    start = resolved_start(stage1)
    model_name = model_name_of(stage1.model_name, stage1.version)
    # the cache folder follows the stage-1 flags (an '_obj-only' cache for stage-1 --no_background, §6.7); outputs
    # stay in the plain run folder and carry the stage-2 suffixes, as model.stage2.resolve_layout does (§12.3)
    cache_run = run_folder(stage1.num_input_frames, start, stage1.attn_layer_idx_end, versions,
                           obj_only=stage1.no_background) + opts.run_suffix
    out_run = run_folder(stage1.num_input_frames, start, stage1.attn_layer_idx_end, versions) + opts.run_suffix
    out_base = Path(opts.output_root) / model_name / out_run
    name = data_name(stage1.dataset, stage1.testset)

    def output(kind: str) -> Path:
        suffixed = output_kind(kind, stage2.point_threshold, stage2.final_score_threshold, stage2.no_background,
                               stage2.fusion, always_threshold_suffix=opts.threshold_grid)
        return out_base / f"inf-uniform-F{stage1.num_input_frames}-{suffixed}" / name

    sam = output("sam-mask")
    return {
        "DATA_NAME": name,
        "CACHE_RUN_FOLDER": cache_run,
        "RUN_FOLDER": out_run,
        "ATTN_DIR": str(cache_folder(model_name, cache_run, stage1.dataset, stage1.testset, root=opts.attn_root)),
        "COARSE_DIR": str(output("attn-mask")),
        "SAM_DIR": str(sam),
        "KEYPOINT_DIR": str(output("keypoint")),
        "ZIP_PATH": str(Path(opts.results_root) / model_name / out_run / sam.parent.name / f"{name}.zip"),
        "LOG_DIR": str(out_base / "logs"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if list(argv[:1]) in (["-h"], ["--help"]):
        helper_parser().print_help()
        return 0
    for key, value in run_paths(argv).items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
