"""Run one DecAF pipeline: the steps behind every ``evaluation/scripts/**/run_*.sh`` (SPEC §10.9, §12.2–§12.4,
§13.4–§13.5).

A run script sets plain variables (the model, checkpoint, dataset, GPU list, ...) and passes them to this runner as
flags; the runner builds every stage command line, names every folder, shards the inference steps over the GPU list
and runs the evaluators. It can also be run directly or imported: ``run(ScriptSettings(...), RunEnvironment())``.

    bash evaluation/scripts/run_qwen2.5-vl-7b_F16_davis.sh          # what users run
    python evaluation/run_pipeline.py --model_name m --version ckpts/X --family_script \
        evaluation/inference_attn_map_qwenvl.py --dataset davis --steps "attn sam sam_eval" --gpu_list 0 1

Steps, always run in this order: attn coarse coarse_eval sam sam_eval keypoints keypoint_eval zip.

The environment selects and places the run (nothing to edit; for users, launchers and tests):
  STAGES            steps to run (default: all the script has), words separated by spaces or commas; 'all',
                    'infer' (attn coarse sam keypoints) and 'eval' (coarse_eval sam_eval keypoint_eval zip) expand
  PYTHON            interpreter of the stages (default: python)
  DEVICE            cuda | cpu (default: cuda when nvidia-smi lists a GPU, else cpu; on cpu the GPU list entries are
                    just separate processes)
  GPUS              space-separated GPU ids that replace the GPU list, e.g. GPUS="0 1"
  DATA_ROOT         benchmark root (default: $DECAF_DATA_ROOT, else datasets/RVOSJoint)
  ATTN_ROOT         cache root (default attn_weights);  OUTPUT_ROOT: mask root (default outputs; the evaluators
                    write metrics to the same path with its 'outputs' component replaced by 'metrics');
                    RESULTS_ROOT: server zips (default results)
  SAM2_CKPT, SAM2_CFG, SAM2_OVERRIDES   SAM2 checkpoint, config and space-separated hydra overrides
  USER_ATTN_ARGS, USER_MASK_ARGS, USER_EVAL_ARGS   flags appended last (so they win) to stage 1, to every stage-2
                    step (coarse, sam, keypoints) and to the evaluators
  EVAL_WORKERS      evaluator processes (default 16)
  DECAF_PREFLIGHT   1 (default): check the data root, meta file and checkpoints once before any shard starts; 0
                    skips that check (the plumbing tests run stub stages on no data)

Sharding (SPEC §10.9): each inference step starts one process per GPU list entry, with
CUDA_VISIBLE_DEVICES=<entry> --subset_num <#entries> --subset_idx <i>; with several shards each logs to
<outputs>/<model>/<run>/logs/, the step waits for all of them and fails if any failed. The stages shard the full job
list first and skip finished jobs inside their shard, so shards never race and a rerun resumes. Under torchrun or
Slurm with more than one task every process runs only its own shard: no fan-out and no subset flags (the stages read
the launcher's variables themselves), one GPU per process. Evaluation needs every rank's outputs and nothing here
is a barrier, so under a launcher the evaluation steps are skipped while inference steps are selected, and
otherwise run on rank 0 only.

The stages are started with this process's environment: the run scripts put the repository first on PYTHONPATH, so
the runner and every stage import the same checkout.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from model.jobs.benchmarks import DEFAULT_DATA_ROOT, shard_from_env
from model.parsers import JOB_FLAGS, RUN_FOLDER_FLAGS
from model.sam import DEFAULT_SAM2_CHECKPOINT, DEFAULT_SAM2_CONFIG
from model.settings import SCRIPT_ATTN_MAX_BATCH, add_settings, default_of, model_name_of
from model.utils.errors import EXIT_JOBS_FAILED, DecafError, run_cli
from model.utils.paths import cache_folder, data_name, output_kind, run_folder

REPO = Path(__file__).resolve().parents[1]
STEP_ORDER = ("attn", "coarse", "coarse_eval", "sam", "sam_eval", "keypoints", "keypoint_eval", "zip")
EVAL_STEPS = ("coarse_eval", "sam_eval", "keypoint_eval", "zip")
INFER_STEPS = tuple(step for step in STEP_ORDER if step not in EVAL_STEPS)
#: the steps whose evaluator compares with local ground truth (MeViS 'valid' has none, SPEC §11.10)
GROUND_TRUTH_STEPS = ("coarse_eval", "sam_eval", "keypoint_eval")
#: lines of a failed shard's log shown on the terminal
LOG_TAIL = 20


def words(text: str) -> list[str]:
    """A flag string split at whitespace, like the shell's word splitting (flags with spaces inside are not
    supported, as in the run scripts' variables)."""
    return text.split()


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ScriptSettings:
    """The variables of one run script (SPEC §13.4–§13.5). Values that go into command lines stay strings, so that
    the stages receive exactly what the script wrote (``0.80``, not ``0.8``)."""

    model_name: str  # MODEL_NAME, path component of caches and outputs (§12.2)
    version: str  # VERSION, MLLM checkpoint folder
    family_script: str  # FAMILY_SCRIPT, stage-1 script relative to the repository
    dataset: str  # DATASET
    steps: tuple[str, ...]  # STEPS, the steps this script has
    gpu_list: tuple[str, ...] = ("0",)  # GPU_LIST, one shard per entry
    testset: bool = False  # TESTSET=1: MeViS 'valid' (server) instead of valid_u
    num_frames: str = str(default_of("num_input_frames"))  # NUM_FRAMES, N
    start_layer: str = str(default_of("attn_layer_idx_start"))  # START_LAYER, an integer or auto (half the depth)
    end_layer: str = str(default_of("attn_layer_idx_end"))  # END_LAYER
    attn_ms_cfg: str = ""  # ATTN_MS_CFG, the stage-1 family flags that change the maps (resolution)
    attn_max_batch: str = str(SCRIPT_ATTN_MAX_BATCH)  # ATTN_MAX_BATCH, stage-1 chunk size: memory only, never results (§5.6)
    point_threshold: str = f"{default_of('point_threshold'):.2f}"  # POINT_THRESHOLD, τ_pq of the SAM step
    final_score_threshold: str = f"{default_of('final_score_threshold'):.2f}"  # FINAL_SCORE_THRESHOLD, τ_trk
    threshold_grid: tuple[str, ...] = ()  # THRESHOLD_GRID: the SAM step once per (τ_trk, τ_pq) pair (§13.5)
    extra_attn_args: str = ""  # EXTRA_ATTN_ARGS, extra stage-1 flags (ablations)
    extra_mask_args: str = ""  # EXTRA_MASK_ARGS, extra stage-2 and keypoint flags (ablations)
    run_suffix: str = ""  # RUN_SUFFIX, appended to the run folder (ablations whose flags name no folder)
    keypoint_offset: str = ""  # KEYPOINT_OFFSET, --offset of the keypoint evaluator (empty: its default)
    script: str = ""  # the run script, named in hints ("STAGES=eval bash <script>"); empty: none


@dataclass(frozen=True)
class RunEnvironment:
    """What the caller's environment sets (the variables of the module docstring); defaults as in the scripts."""

    stages: str = "all"
    python: str = "python"
    device: str = "cpu"
    gpus: tuple[str, ...] = ()  # empty: use the script's GPU list
    data_root: str = DEFAULT_DATA_ROOT
    attn_root: str = "attn_weights"
    output_root: str = "outputs"
    results_root: str = "results"
    sam2_ckpt: str = DEFAULT_SAM2_CHECKPOINT
    sam2_cfg: str = DEFAULT_SAM2_CONFIG
    sam2_overrides: tuple[str, ...] = ()
    user_attn_args: tuple[str, ...] = ()
    user_mask_args: tuple[str, ...] = ()
    user_eval_args: tuple[str, ...] = ()
    eval_workers: str = "16"
    preflight: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RunEnvironment:
        """Read the variables; an empty one counts as unset, as ``${VAR:-default}`` does in the shell."""
        def get(name: str, default: str) -> str:
            return environ.get(name) or default

        device = environ.get("DEVICE") or detect_device()
        if device not in ("cuda", "cpu"):
            raise DecafError(f"DEVICE must be cuda or cpu, got '{device}'")
        defaults = cls()
        return cls(stages=get("STAGES", defaults.stages), python=get("PYTHON", defaults.python), device=device,
                   gpus=tuple(words(get("GPUS", ""))),
                   data_root=get("DATA_ROOT", get("DECAF_DATA_ROOT", defaults.data_root)),
                   attn_root=get("ATTN_ROOT", defaults.attn_root),
                   output_root=get("OUTPUT_ROOT", defaults.output_root),
                   results_root=get("RESULTS_ROOT", defaults.results_root),
                   sam2_ckpt=get("SAM2_CKPT", defaults.sam2_ckpt), sam2_cfg=get("SAM2_CFG", defaults.sam2_cfg),
                   sam2_overrides=tuple(words(get("SAM2_OVERRIDES", ""))),
                   user_attn_args=tuple(words(get("USER_ATTN_ARGS", ""))),
                   user_mask_args=tuple(words(get("USER_MASK_ARGS", ""))),
                   user_eval_args=tuple(words(get("USER_EVAL_ARGS", ""))),
                   eval_workers=get("EVAL_WORKERS", defaults.eval_workers),
                   preflight=get("DECAF_PREFLIGHT", "1") != "0")


def detect_device() -> str:
    """cuda when ``nvidia-smi -L`` lists a GPU, else cpu (without importing torch: the runner only starts stages)."""
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    listed = subprocess.run(["nvidia-smi", "-L"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return "cuda" if listed.returncode == 0 else "cpu"


def select_steps(steps: Sequence[str], stages: str, testset: bool) -> list[str]:
    """STAGES → the selected steps of the script, in the fixed order of STEP_ORDER."""
    unknown = [step for step in steps if step not in STEP_ORDER]
    if unknown:
        raise DecafError(f"STEPS names an unknown step '{unknown[0]}'; the steps are: {' '.join(STEP_ORDER)}")
    wanted: set[str] = set()
    for word in re.split(r"[\s,]+", stages.strip()):
        if word == "all":
            wanted.update(steps)
        elif word == "infer":
            wanted.update(step for step in steps if step in INFER_STEPS)
        elif word == "eval":
            wanted.update(step for step in steps if step in EVAL_STEPS)
        elif word in steps:
            wanted.add(word)
        elif word:
            raise DecafError(f"STAGES names '{word}', which this script does not have; its steps are: "
                             f"{' '.join(steps)} (or all, infer, eval)")
    selected = [step for step in STEP_ORDER if step in wanted]
    if not selected:
        raise DecafError(f"STAGES='{stages}' selects no step; this script has: {' '.join(steps)}")
    if testset and any(step in selected for step in GROUND_TRUTH_STEPS):
        raise DecafError("MeViS 'valid' (TESTSET=1) has no local ground truth: score it on the server (zip step)")
    return selected


# ------------------------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class Launcher:
    """torchrun or Slurm with more than one task: this process runs shard ``rank`` of ``size`` (SPEC §10.9)."""

    name: str
    size: int
    rank: int
    local_rank: int  # index of this process's GPU among the node's visible GPUs

    def cuda_devices(self, visible: str) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES for this process: one GPU, the local rank's among ``visible`` (a one-GPU list is
        kept as it is: the launcher already gave each process its GPU)."""
        devices = [device for device in visible.split(",") if device]
        if not devices:
            return {"CUDA_VISIBLE_DEVICES": str(self.local_rank)}
        if len(devices) > 1:
            return {"CUDA_VISIBLE_DEVICES": devices[self.local_rank % len(devices)]}
        return {}


#: launcher → the variable of its local rank (torchrun falls back to RANK, Slurm to 0)
LOCAL_RANK_VARS = {"torchrun": "LOCAL_RANK", "slurm": "SLURM_LOCALID"}


def detect_launcher() -> Launcher | None:
    """The launcher of this process, if any. Size and rank come from ``shard_from_env``, the function the stages
    themselves use, so the runner and the stages it starts agree on the shard (torchrun before Slurm)."""
    size, rank = shard_from_env(1, 0)
    if size == 1:
        return None
    environ = os.environ
    # shard_from_env took torchrun's variables when they give this size and a rank, else Slurm's
    name = "torchrun" if environ.get("RANK") and environ.get("WORLD_SIZE", "").strip() == str(size) else "slurm"
    local_var = LOCAL_RANK_VARS[name]
    local = environ.get(local_var) or (str(rank) if name == "torchrun" else "0")
    if not local.isdigit():
        raise DecafError(f"{name}: {local_var} must be an integer, got '{local}'")
    return Launcher(name, size, rank, int(local))


# ------------------------------------------------------------------------------------------------ folders
def stage_parser() -> argparse.ArgumentParser:
    """The folder-naming subset of the stage flags (SPEC §13.2); every other flag is ignored. Parsing the very
    argument lists the stages get keeps the folders right whatever USER_*_ARGS add."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_settings(parser, (*JOB_FLAGS, *RUN_FOLDER_FLAGS, "no_background", "fusion", "point_threshold",
                          "final_score_threshold", "vis_save_path"))
    return parser


def parse_stage_args(argv: Sequence[str]) -> argparse.Namespace:
    """The folder-naming flags of one stage command line; explicit save paths are refused (the runner sets them)."""
    args, _ = stage_parser().parse_known_args(list(argv))
    if args.attn_save_path or args.vis_save_path:
        raise DecafError("the run scripts set --attn_save_path/--vis_save_path themselves; move the run with "
                         "ATTN_ROOT, OUTPUT_ROOT or RUN_SUFFIX instead")
    return args


def resolved_start(args: argparse.Namespace) -> int:
    """The start layer in folder names: ``auto`` is read from the checkpoint's depth, as the stages do (§5.1)."""
    if args.attn_layer_idx_start != "auto":
        return args.attn_layer_idx_start
    if not args.version:
        raise DecafError("START_LAYER=auto needs VERSION (the checkpoint folder) to read the model depth")
    from model.adapters.base import layer_count, read_checkpoint_config, resolve_layer_range

    return resolve_layer_range(layer_count(read_checkpoint_config(args.version)), "auto",
                               args.attn_layer_idx_end)[0]


@dataclass(frozen=True)
class Folders:
    """What one pipeline reads and writes for one SAM threshold pair (SPEC §12.2–§12.4)."""

    data_name: str
    attn_dir: Path  # attention caches
    coarse_dir: Path  # coarse masks
    sam_dir: Path  # SAM2 masks
    keypoint_dir: Path  # keypoints
    zip_path: Path  # server zip of the SAM masks
    log_dir: Path  # shard logs


def folders(stage1: argparse.Namespace, sam: argparse.Namespace, env: RunEnvironment, run_suffix: str = "",
            threshold_grid: bool = False) -> Folders:
    """The folders, named by ``model.utils.paths`` like the stages' own defaults (stage 1: ``model/stage1.py``;
    stage 2 and keypoints: ``model.stage2.resolve_layout``), so runs with and without the scripts agree.

    ``stage1`` and ``sam`` are the parsed stage-1 and SAM-step arguments; ``threshold_grid`` names the SAM folder
    with its thresholds even at 0.80/0.80 (§13.5).
    """
    versions = (stage1.prompt_obj_ver, stage1.prompt_bg_ver, stage1.prompt_obj_cnt_ver)
    start = resolved_start(stage1)
    model_name = model_name_of(stage1.model_name, stage1.version)
    # the cache follows the stage-1 flags (an '_obj-only' cache for stage-1 --no_background, §6.7); outputs stay in
    # the plain run folder and carry the stage-2 suffixes, as model.stage2.resolve_layout does (§12.3)
    cache_run = run_folder(stage1.num_input_frames, start, stage1.attn_layer_idx_end, versions,
                           obj_only=stage1.no_background) + run_suffix
    out_run = run_folder(stage1.num_input_frames, start, stage1.attn_layer_idx_end, versions) + run_suffix
    out_base = Path(env.output_root) / model_name / out_run
    name = data_name(stage1.dataset, stage1.testset)

    def output(kind: str) -> Path:
        suffixed = output_kind(kind, sam.point_threshold, sam.final_score_threshold, sam.no_background, sam.fusion,
                               always_threshold_suffix=threshold_grid)
        return out_base / f"inf-uniform-F{stage1.num_input_frames}-{suffixed}" / name

    sam_dir = output("sam-mask")
    return Folders(data_name=name,
                   attn_dir=cache_folder(model_name, cache_run, stage1.dataset, stage1.testset, root=env.attn_root),
                   coarse_dir=output("attn-mask"), sam_dir=sam_dir, keypoint_dir=output("keypoint"),
                   zip_path=Path(env.results_root) / model_name / out_run / sam_dir.parent.name / f"{name}.zip",
                   log_dir=out_base / "logs")


def check_inputs(steps: Sequence[str], stage1: argparse.Namespace, sam2_ckpt: str) -> None:
    """What the selected steps read must exist: checked once, before any shard starts, so that a configuration
    error is one line and not one per GPU shard (SPEC §10.1, §13.2)."""
    from model.jobs.benchmarks import list_jobs

    if any(step in steps for step in STEP_ORDER if step != "zip"):
        if not list_jobs(stage1.dataset, stage1.data_root, stage1.testset):  # reading the meta file names a gap
            raise DecafError(f"the {stage1.dataset} meta file under {stage1.data_root} lists no expression")
    if "attn" in steps:
        from model.adapters import adapter_for_checkpoint
        from model.adapters.base import check_checkpoint_files

        adapter_for_checkpoint(stage1.version)  # config.json present and a supported family
        check_checkpoint_files(stage1.version)
    if "sam" in steps and not Path(sam2_ckpt).is_file():
        raise DecafError(f"SAM2 checkpoint not found: {sam2_ckpt}; set SAM2_CKPT or see ckpts/README.md")


# ------------------------------------------------------------------------------------------------ commands
@dataclass(frozen=True)
class Command:
    """One process to start: its argument list and the variables it gets on top of this process's environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def shown(self) -> str:
        """The command as a shell would run it, ``env VAR=value`` first, like ``set -x`` prints it."""
        prefix = ["env", *(f"{key}={value}" for key, value in self.env.items())] if self.env else []
        return "+ " + shlex.join([*prefix, *self.argv])

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def say(line: str, error: bool = False) -> None:
    """Print at once: the stages write to the same terminal, and their lines must come after the runner's."""
    print(line, file=sys.stderr if error else sys.stdout, flush=True)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_command(command: Command) -> int:
    say(command.shown())
    return exit_status(subprocess.run(command.argv, env=command.environment()).returncode)


def stop(processes: Iterable[subprocess.Popen]) -> None:
    """Terminate the shards, then wait for them: no shard outlives an interrupted runner."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait()


def run_shards(label: str, shards: Sequence[Command], gpus: Sequence[str], log_dir: Path, data: str) -> int:
    """Run the shards of one step in parallel, each logging to its own file, and wait for all (SPEC §10.9).

    Returns the first failed shard's status (0 when all succeeded); a single shard keeps its output (its progress
    bar) on the terminal.
    """
    if len(shards) == 1:
        return run_command(shards[0])
    count = len(shards)
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"{data}_{label}_shard{index}-of-{count}.log" for index in range(count)]
    processes: list[subprocess.Popen] = []
    try:
        for shard, log in zip(shards, logs):
            say(f"{shard.shown()} > {log} 2>&1 &")
            with open(log, "wb") as log_file:  # the child holds its own copy of the file
                processes.append(subprocess.Popen(shard.argv, env=shard.environment(), stdout=log_file,
                                                  stderr=subprocess.STDOUT))
        statuses = [exit_status(process.wait()) for process in processes]
    except BaseException:  # Ctrl-C or SIGTERM while shards run
        stop(processes)
        raise
    failed = 0
    for index, (status, gpu, log) in enumerate(zip(statuses, gpus, logs)):
        if status:
            say(f"shard {index} of {count} (GPU_LIST entry {gpu}) failed with exit code {status}; end of {log}:",
                error=True)
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            if tail:
                say("\n".join(tail), error=True)
            failed = failed or status
    if failed == EXIT_JOBS_FAILED:  # the step finished, some jobs failed (listed in its manifest)
        say(f"error: step '{label}' failed some jobs in at least one shard; fix their inputs and rerun: finished "
            f"jobs are kept and only the failed ones run again", error=True)
    elif failed:
        say(f"error: step '{label}' failed in at least one shard (see the lines above)", error=True)
    return failed


class StepFailed(Exception):
    """A step's command failed; the run stops with its status (the shell's ``set -e``)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# ------------------------------------------------------------------------------------------------ the pipeline
class Pipeline:
    """The selected steps of one run script, with every command line and folder (SPEC §13.4–§13.5)."""

    def __init__(self, settings: ScriptSettings, env: RunEnvironment) -> None:
        if not settings.gpu_list and not env.gpus:
            raise DecafError("GPU_LIST is empty; list at least one GPU id, e.g. GPU_LIST=(0)")
        self.settings = settings
        self.env = env
        self.gpus = env.gpus or settings.gpu_list
        self.selected = select_steps(settings.steps, env.stages, settings.testset)
        self.launcher = detect_launcher()
        testset = ["--testset"] if settings.testset else []
        # flags every stage gets: they name the run folder and the jobs (SPEC §12.2, §10.1)
        common = ["--dataset", settings.dataset, *testset, "--data_root", env.data_root, "--model_name",
                  settings.model_name, "--version", settings.version, "--num_input_frames", settings.num_frames,
                  "--attn_layer_idx_start", settings.start_layer, "--attn_layer_idx_end", settings.end_layer]
        # --attn_max_batch right after the family flags: where the reference scripts' ATTN_MS_CFG had it
        self.stage1 = [*common, *words(settings.attn_ms_cfg), "--attn_max_batch", settings.attn_max_batch,
                       *words(settings.extra_attn_args), *env.user_attn_args]
        self.stage2 = [*common, *words(settings.extra_mask_args), *env.user_mask_args]
        self.mask_common = [*common, *words(settings.extra_mask_args)]
        self.stage1_args = parse_stage_args(self.stage1)
        parse_stage_args(self.stage2)

    # -- command lines
    def sam_args(self, point: str, trk: str) -> list[str]:
        """The SAM step's flags; the thresholds go before the user's flags so that USER_MASK_ARGS can change them."""
        return [*self.mask_common, "--point_threshold", point, "--final_score_threshold", trk,
                *self.env.user_mask_args]

    def folders(self, point: str, trk: str, grid: bool = False) -> Folders:
        return folders(self.stage1_args, parse_stage_args(self.sam_args(point, trk)), self.env,
                       self.settings.run_suffix, grid)

    def stage(self, script: str, *args: str | Path) -> list[str]:
        return [self.env.python, str(REPO / script), *map(str, args)]

    def evaluator(self, script: str, prediction: Path, *flags: str) -> Command:
        return Command(tuple(self.stage(script, prediction, "--dataset", self.settings.dataset, "--data_root",
                                        self.env.data_root, "--num_workers", self.env.eval_workers, *flags,
                                        *self.env.user_eval_args)))

    def shards(self, argv: Sequence[str], takes_device: bool) -> list[Command]:
        """One command per shard: --subset_num/--subset_idx and, where the stage takes one, --device and its GPU;
        under a launcher the one shard of this process (the stage reads the launcher's variables itself)."""
        device = ["--device", self.env.device] if takes_device else []
        if self.launcher is not None:
            gpu = self.launcher.cuda_devices(os.environ.get("CUDA_VISIBLE_DEVICES", "")) \
                if self.env.device == "cuda" else {}
            return [Command((*argv, *device), gpu)]
        count = len(self.gpus)
        return [Command((*argv, "--subset_num", str(count), "--subset_idx", str(index), *device),
                        {"CUDA_VISIBLE_DEVICES": gpu} if takes_device and self.env.device == "cuda" else {})
                for index, gpu in enumerate(self.gpus)]

    # -- running
    def sharded(self, label: str, argv: Sequence[str], data: Folders, takes_device: bool = True) -> None:
        status = run_shards(label, self.shards(argv, takes_device), self.gpus, data.log_dir, data.data_name)
        if status:
            raise StepFailed(status)

    @staticmethod
    def single(command: Command) -> None:
        status = run_command(command)
        if status:
            raise StepFailed(status)

    def may_evaluate(self, step: str) -> bool:
        """Evaluation and zip steps need every shard's outputs, and under a launcher nothing waits for them."""
        if self.launcher is None:
            return True
        name, rank = self.launcher.name, self.launcher.rank
        if any(selected in INFER_STEPS for selected in self.selected):
            again = f"STAGES=eval bash {self.settings.script}" if self.settings.script else \
                "the same command with STAGES=eval"
            say(f"{name} rank {rank}: step '{step}' skipped (other ranks may still be running); once every rank "
                f"has finished, run: {again}")
            return False
        if rank != 0:
            say(f"{name} rank {rank}: step '{step}' runs on rank 0 only")
            return False
        return True

    def sam_cells(self, main: Folders) -> None:
        """The SAM step and its evaluation, once per threshold pair (one pair unless THRESHOLD_GRID is set)."""
        settings = self.settings
        grid = settings.threshold_grid
        # τ_trk outer, τ_pq inner: the row order of paper Table 6
        cells = [(trk, point) for trk in grid for point in grid] if grid else \
            [(settings.final_score_threshold, settings.point_threshold)]
        overrides = ["--sam2_overrides", *self.env.sam2_overrides] if self.env.sam2_overrides else []
        for trk, point in cells:
            data = self.folders(point, trk, grid=True) if grid else main
            if "sam" in self.selected:
                say(f"== SAM masks (τ_trk {trk}, τ_pq {point}) → {data.sam_dir}")
                self.sharded(data.sam_dir.parent.name, self.stage(
                    "inference_attn_mask.py", *self.sam_args(point, trk), "--predict_sam_mask",
                    "--vision_pretrained", self.env.sam2_ckpt, "--vision_pretrained_config", self.env.sam2_cfg,
                    *overrides, "--attn_save_path", data.attn_dir, "--vis_save_path", data.sam_dir), data)
            if "sam_eval" in self.selected and self.may_evaluate("sam_eval"):
                say(f"== evaluation of {data.sam_dir}")
                self.single(self.evaluator("evaluation/eval_rvos.py", data.sam_dir))

    def run(self) -> None:
        """Run the selected steps in order; raises StepFailed with the status of the first failed command."""
        settings, env, launcher = self.settings, self.env, self.launcher
        if launcher is not None:
            say(f"{launcher.name}: rank {launcher.rank} of {launcher.size} runs shard {launcher.rank} "
                f"(GPU_LIST is not used)")
        if env.preflight:
            check_inputs(self.selected, self.stage1_args, env.sam2_ckpt)
        data = self.folders(settings.point_threshold, settings.final_score_threshold)
        shards = f"one {launcher.name} shard per process" if launcher is not None else \
            f"{len(self.gpus)} shard(s) on GPU_LIST ({' '.join(self.gpus)})"
        say(f"== {settings.model_name} on {data.data_name}: steps {' '.join(self.selected)}; device {env.device}, "
            f"{shards}; cache {data.attn_dir}")
        for step in self.selected:
            if step == "attn":
                say(f"== stage 1: attention maps → {data.attn_dir}")
                self.sharded("attn-map", self.stage(settings.family_script, *self.stage1, "--attn_save_path",
                                                    data.attn_dir), data)
            elif step == "coarse":
                say(f"== coarse attention masks → {data.coarse_dir}")
                self.sharded(data.coarse_dir.parent.name, self.stage(
                    "inference_attn_mask.py", *self.stage2, "--predict_attn_mask", "--attn_save_path",
                    data.attn_dir, "--vis_save_path", data.coarse_dir), data)
            elif step == "coarse_eval" and self.may_evaluate(step):
                say(f"== coarse evaluation of {data.coarse_dir}")
                self.single(self.evaluator("evaluation/eval_rvos_obj_iou.py", data.coarse_dir))
            elif step == "sam" or (step == "sam_eval" and "sam" not in self.selected):
                self.sam_cells(data)  # the SAM step and its evaluation alternate per threshold pair
            elif step == "keypoints":
                say(f"== keypoints → {data.keypoint_dir}")
                # the keypoint stage has no --device flag
                self.sharded(data.keypoint_dir.parent.name, self.stage(
                    "inference_keypoints.py", *self.stage2, "--attn_save_path", data.attn_dir, "--vis_save_path",
                    data.keypoint_dir), data, takes_device=False)
            elif step == "keypoint_eval" and self.may_evaluate(step):
                offset = ["--offset", settings.keypoint_offset] if settings.keypoint_offset else []
                say(f"== keypoint evaluation of {data.keypoint_dir}")
                self.single(self.evaluator("evaluation/eval_rvos_keypoints.py", data.keypoint_dir, *offset))
            elif step == "zip" and self.may_evaluate(step):
                say(f"== server zip of {data.sam_dir} → {data.zip_path}")
                self.single(Command(tuple(self.stage("evaluation/zip_refvos_results.py", data.sam_dir,
                                                     data.zip_path, "--dataset", settings.dataset))))
        say(f"== finished: {' '.join(self.selected)}")


def run(settings: ScriptSettings, env: RunEnvironment) -> int:
    """Run a pipeline; returns the exit status (0, or the first failed command's: 3 = some jobs failed)."""
    try:
        Pipeline(settings, env).run()
    except StepFailed as failed:
        return failed.status
    return 0


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    """The run script's variables as flags; the generated scripts pass every one with ``--flag=value``, which
    also carries values that start with '-' (``--end_layer=-1``, ``--extra_attn_args=--no_background``)."""
    parser = argparse.ArgumentParser(
        description="Run the steps of one DecAF run script (SPEC §13.4): build the stage commands, shard them over\n"
                    "the GPU list, evaluate. The generated scripts in evaluation/scripts pass these flags.",
        epilog=__doc__[__doc__.index("The environment selects"):],
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    defaults = ScriptSettings("", "", "", "", ())
    parser.add_argument("--model_name", required=True, help="MODEL_NAME: path component of caches and outputs")
    parser.add_argument("--version", required=True, help="VERSION: MLLM checkpoint folder")
    parser.add_argument("--family_script", required=True,
                        help="FAMILY_SCRIPT: stage-1 script relative to the repository, e.g. "
                             "evaluation/inference_attn_map_qwenvl.py")
    parser.add_argument("--dataset", required=True, help="DATASET: davis, revos, reasonvos, mevis or ytvos")
    parser.add_argument("--steps", required=True,
                        help=f"STEPS: the script's steps, space-separated, a subset of: {' '.join(STEP_ORDER)}")
    parser.add_argument("--gpu_list", nargs="+", default=list(defaults.gpu_list),
                        help="GPU_LIST: GPU ids, one shard process per entry (the GPUS variable replaces them)")
    parser.add_argument("--testset", choices=("0", "1"), default="0",
                        help="TESTSET: 1 = MeViS 'valid' (server-scored) instead of valid_u")
    parser.add_argument("--num_frames", default=defaults.num_frames, help="NUM_FRAMES: N, frames per video")
    parser.add_argument("--start_layer", default=defaults.start_layer,
                        help="START_LAYER: first rollout layer, an integer or auto (half the LLM depth)")
    parser.add_argument("--end_layer", default=defaults.end_layer, help="END_LAYER: rollout end layer")
    parser.add_argument("--attn_ms_cfg", default=defaults.attn_ms_cfg,
                        help="ATTN_MS_CFG: stage-1 resolution flags of the family (they change the maps)")
    parser.add_argument("--attn_max_batch", default=defaults.attn_max_batch,
                        help="ATTN_MAX_BATCH: stage-1 chunk size, an integer or auto (memory only)")
    parser.add_argument("--point_threshold", default=defaults.point_threshold, help="POINT_THRESHOLD: τ_pq")
    parser.add_argument("--final_score_threshold", default=defaults.final_score_threshold,
                        help="FINAL_SCORE_THRESHOLD: τ_trk")
    parser.add_argument("--threshold_grid", nargs="+", default=[],
                        help="THRESHOLD_GRID: run the SAM step and its evaluation once per (τ_trk, τ_pq) pair of "
                             "these values, each into its own folder (SPEC §13.5)")
    parser.add_argument("--extra_attn_args", default="", help="EXTRA_ATTN_ARGS: extra stage-1 flags")
    parser.add_argument("--extra_mask_args", default="", help="EXTRA_MASK_ARGS: extra stage-2 and keypoint flags")
    parser.add_argument("--run_suffix", default="", help="RUN_SUFFIX: appended to the run folder F<N>_L<start>-<end>")
    parser.add_argument("--keypoint_offset", default="", help="KEYPOINT_OFFSET: --offset of the keypoint evaluator")
    parser.add_argument("--script", default=defaults.script, help="the run script, named in hints")
    return parser


def settings_from_args(args: argparse.Namespace) -> ScriptSettings:
    return ScriptSettings(
        model_name=args.model_name, version=args.version, family_script=args.family_script, dataset=args.dataset,
        steps=tuple(words(args.steps)), gpu_list=tuple(args.gpu_list), testset=args.testset == "1",
        num_frames=args.num_frames, start_layer=args.start_layer, end_layer=args.end_layer,
        attn_ms_cfg=args.attn_ms_cfg, attn_max_batch=args.attn_max_batch, point_threshold=args.point_threshold,
        final_score_threshold=args.final_score_threshold, threshold_grid=tuple(args.threshold_grid),
        extra_attn_args=args.extra_attn_args, extra_mask_args=args.extra_mask_args, run_suffix=args.run_suffix,
        keypoint_offset=args.keypoint_offset, script=args.script)


def raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a job scheduler, ``timeout``) stops the shards like Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(build_parser().parse_args(argv))
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return run(settings, RunEnvironment.from_environ(os.environ))
    except KeyboardInterrupt:
        say("interrupted: the running shards were stopped; rerun to resume (finished jobs are kept)", error=True)
        return 130


if __name__ == "__main__":
    run_cli(main)
