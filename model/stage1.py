"""Stage 1: attention extraction over a benchmark (SPEC §1.1, §10.9, §12.2, §12.6).

Shared by every ``evaluation/inference_attn_map_<family>.py``: each script only names its adapter class and the
family flags it accepts. Jobs are sharded over the full list first and finished jobs skipped afterwards (§10.9); an
existing cache is trusted only if it validates and was made with the same settings (§12.2). Each job is computed
under a claim (:func:`model.utils.atomic.output_claim`), so concurrent processes on one cache folder never compute a
job twice. Everything a run needs (checkpoint files, a writable cache folder) is checked before any job starts.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from model.adapters import extraction_script
from model.adapters.base import (AdapterOptions, MLLMAdapter, check_checkpoint_files, default_attn_implementation,
                                 layer_count, read_checkpoint_config, resolve_layer_range)
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.attention.prompts import is_empty_expression
from model.cache import CacheMeta, expected_meta, load_cache, save_cache, setting_mismatches
from model.jobs.benchmarks import Job, list_jobs, shard_from_env, shard_jobs
from model.jobs.runner import JobRunner, Outcome
from model.settings import default_device, model_name_of
from model.utils.atomic import check_writable_folder, library_versions
from model.utils.errors import DecafError
from model.utils.paths import cache_file_name, cache_folder, run_folder
from model.utils.run_record import RunRecord, StepCounter
from model.utils.video import check_frame_sizes, list_frames, sample_indices, verify_decodable

log = logging.getLogger("decaf.stage1")

ATTN_MAP = "attn-map"  # the one output kind of a stage-1 job: its cache file

def cache_finished(path: Path, expected: dict[str, Any]) -> bool:
    """True if ``path`` is a valid cache made with the expected settings; raise if it conflicts (§12.2)."""
    if not path.exists():
        return False
    cache = load_cache(path)  # a corrupt file raises, naming it
    diffs = setting_mismatches(cache.meta, expected)
    if diffs:
        raise DecafError(f"{path} exists but was made with other settings ({', '.join(diffs)}); "
                         "use --overwrite to recompute it")
    return True


def run_stage1(args: argparse.Namespace, adapter_class: type[MLLMAdapter]) -> int:
    """Stage 1 on parsed arguments (:func:`model.parsers.build_stage1_parser`) with one family's adapter; the
    family's input flags are those :class:`AdapterOptions` declares for the families of ``adapter_class``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_input_frames < 1:
        raise DecafError("--num_input_frames must be positive")

    config = read_checkpoint_config(args.version)  # fails now, before any job, for a missing checkpoint
    model_type = config.get("model_type")
    if model_type not in adapter_class.model_types:
        script = extraction_script(model_type)
        hint = f"; use {script}" if script else "; no DecAF adapter supports it"
        raise DecafError(f"checkpoint {args.version} is a {model_type!r} model; this script handles "
                         f"{sorted(adapter_class.model_types)}{hint}")
    check_checkpoint_files(args.version)  # weights, processor and tokenizer present: an incomplete download fails now
    family = adapter_class.model_types[model_type]
    if args.family and args.family != family:  # SPEC §13.2: the run was meant for another family
        raise DecafError(f"--family {args.family}, but checkpoint {args.version} is a {family} model by its "
                         f"config.json (model_type {model_type!r}); drop --family or point --version at a "
                         f"{args.family} checkpoint")
    num_layers = layer_count(config)
    start, end = resolve_layer_range(num_layers, args.attn_layer_idx_start, args.attn_layer_idx_end)
    versions = (args.prompt_obj_ver, args.prompt_bg_ver, args.prompt_obj_cnt_ver)
    folder = Path(args.attn_save_path) if args.attn_save_path else cache_folder(
        model_name_of(args.model_name, args.version), run_folder(args.num_input_frames, start, args.attn_layer_idx_end, versions,
                                        obj_only=args.no_background), args.dataset, args.testset)
    check_writable_folder(folder)
    family_flags = AdapterOptions.flags_for(tuple(adapter_class.model_types.values()))
    options = AdapterOptions(**{name: getattr(args, name) for name in family_flags})
    device = args.device or default_device()
    attn_impl = args.attn_implementation or default_attn_implementation()
    resolution = {name: getattr(options, name) for name in AdapterOptions.names()}
    resolution.update(adapter_class.matched_settings(args.image_processor))  # backend and M-RoPE rule (§12.2)

    subset_num, subset_idx = shard_from_env(args.subset_num, args.subset_idx)
    skipped: list[tuple[str, str]] = []
    jobs = shard_jobs(list_jobs(args.dataset, args.data_root, args.testset, skipped=skipped), subset_num, subset_idx)
    expected = expected_meta(family=family, checkpoint=args.version, num_layers=num_layers, layer_start=start,
                             layer_end=end, num_input_frames=args.num_input_frames, prompt_versions=versions,
                             resolution=resolution)
    runner = JobRunner(lambda _kind, path: cache_finished(path, expected), overwrite=args.overwrite)
    scan = runner.scan((job, {ATTN_MAP: folder / cache_file_name(job.vid_name, job.exp_id)}) for job in jobs)
    log.info("shard %d/%d: %d jobs, %d to run, cache folder %s", subset_idx, subset_num, len(jobs),
             len(scan.pending), folder)

    adapter = None
    if scan.pending and not (scan.unusable and args.fail_fast):  # the model loads only when there is work, before
        # the progress bar
        adapter = adapter_class(args.version, device=device, precision=args.precision, attn_implementation=attn_impl,
                                image_processor=args.image_processor, options=options)
    record = RunRecord(len(jobs), f"stage 1 [{args.dataset}]", args.fail_fast, skipped)
    # the paper's code ran these too (SPEC §2.1 makes "" into "."): benchmark scores need every expression
    empty = [job.job_id for job in jobs if is_empty_expression(job.expression)]
    if empty:
        record.warn(f"{len(empty)} expression(s) are empty or whitespace only (first: {empty[0]}); they run as in "
                    "the paper, with '.' appended (SPEC §2.1), and are listed in the manifest")
    scan.report(record)
    peak_prefix_gib = 0.0
    if adapter is not None and not record.stopped:
        settings = PipelineSettings(
            layer_start=start, layer_end=end, obj_version=args.prompt_obj_ver, bg_version=args.prompt_bg_ver,
            choice_version=args.prompt_obj_cnt_ver, attn_max_batch=args.attn_max_batch,
            rollout_impl=args.rollout_impl,
            rollout_dtype=torch.bfloat16 if args.rollout_dtype == "bf16" else torch.float32,
            no_background=args.no_background, save_bg_captions=args.save_bg_captions,
            max_new_tokens=args.max_new_tokens, share_prefix=not args.no_prefix_cache)
        pipeline = PromptingPipeline(adapter, settings)
        pipeline.bar = StepCounter(record.bar, "MLLM pass")  # the passes of the current job, on the run's bar
        with logging_redirect_tqdm():
            for video_jobs in scan.by_video():
                if record.stopped:
                    break
                memory = VideoMemory(device)
                # the video's visual prefixes are computed by its first pending job and freed after its last
                with pipeline.video_session():
                    for job, outputs in video_jobs:
                        if record.stopped:
                            break
                        runner.run(job, outputs, lambda todo, job=job: run_job(
                            pipeline, job, todo[ATTN_MAP], checkpoint=args.version,
                            num_input_frames=args.num_input_frames, num_layers=num_layers), record)
                peak_prefix_gib = max(peak_prefix_gib, memory.report(video_jobs[0][0], len(video_jobs), pipeline))

    return record.close([folder], ATTN_MAP, args, resolved={
        "family": family, "layer_start": start, "layer_end": end, "device": device, "attn_implementation": attn_impl,
        "subset_num": subset_num, "subset_idx": subset_idx, "cache_folder": str(folder),
        "peak_prefix_gib_per_video": round(peak_prefix_gib, 3)}, empty_expressions=empty)


class VideoMemory:
    """What one video's per-video work costs in memory (SPEC §5.8f): the most its shared prefixes held at once,
    and on CUDA the peak allocation while it ran. Logged once per video, so a user sees what bounds
    ``--attn_max_batch`` and the prefix cache before a run grows to a long video."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def report(self, job: Job, jobs: int, pipeline: PromptingPipeline) -> float:
        """Log the video's memory; return what its prefixes held, in GiB."""
        held = pipeline.session_peak_bytes
        peak = f", peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB allocated" if self.cuda else ""
        log.info("video %s: %d job(s), shared prefixes held %.2f MiB at most%s", job.video_key, jobs, held / 2**20,
                 peak)
        return held / 2**30


def run_job(pipeline: PromptingPipeline, job: Job, path: Path, *, checkpoint: str, num_input_frames: int,
            num_layers: int) -> Outcome:
    """Extract and save the four maps of one (video, expression) job; ``checkpoint`` is recorded as given."""
    frames = list_frames(job.frames_dir)
    frame0_size = check_frame_sizes(frames)
    indices = sample_indices(len(frames), num_input_frames)
    sampled = [frames[i] for i in indices]
    for frame in sampled:
        verify_decodable(frame)
    result = pipeline.run(sampled, job.expression, allow_empty=True)  # a benchmark scores every expression
    adapter, settings = pipeline.adapter, pipeline.settings
    meta = CacheMeta(
        family=adapter.family, checkpoint=checkpoint, checkpoint_revision=adapter.revision, num_layers=num_layers,
        layer_start=settings.layer_start, layer_end=settings.layer_end, num_input_frames=num_input_frames,
        frames_count=len(frames), key_frame_indices=indices, frame0_size=list(frame0_size),
        video_grid=list(result.video_grid), frame_grid=list(result.frame_grid),
        tiling=list(result.tiling) if result.tiling else None,
        prompt_versions={"obj": settings.obj_version, "bg": settings.bg_version, "choice": settings.choice_version},
        prompts=result.prompts, texts=result.texts,
        settings={**adapter.settings(), "attn_max_batch": settings.attn_max_batch,
                  "rollout_impl": settings.rollout_impl,
                  "rollout_dtype": "bf16" if settings.rollout_dtype == torch.bfloat16 else "fp32",
                  "max_new_tokens": settings.max_new_tokens},
        versions={k: v for k, v in library_versions().items() if k in ("decaf", "torch", "transformers")},
        dataset=job.dataset, video_key=job.video_key, exp_id=job.exp_id, expression=job.expression)
    return Outcome(save_cache(path, result.maps, meta).name)
