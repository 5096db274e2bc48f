"""Stage-1 benchmark on the full-size MLLM architecture with random weights (GPU).

Measures, for one family, the capture overhead of every call type against a plain bf16 prefill of the same inputs
(no capture), for the streamed rollout (SPEC §5.8a) and the paper-literal one (§5.2–§5.4), with peak GPU memory;
the streamed-vs-literal error on q/k captured in the same forward (T1 of §0.5); and, optionally, a whole expression
(five calls) of our pipeline against the paper-style path (literal capture, every pass decoded). Timings do not
depend on weight values, so random weights give the real costs. The processor and tokenizer (real Qwen2
vocabulary) come from a tiny offline checkpoint of the same family.

    python benchmarks/bench_stage1.py --family qwen2_5_vl --frames 16 64 --chunks 1 4 8 --out results.json

``--per_video`` instead times stage 1 per expression on one video with several expressions: the per-video path
(each visual input's prefix prefilled once and shared, SPEC §5.8f) against the unshared path (every call from
scratch, ``--no_prefix_cache``), with answers fixed at ``--answer_tokens`` new tokens. Median and min–max over
``--repeats``, peak GPU memory, and how many prefix prefills and continued calls ran. ``--tiny`` runs it on the
family's tiny checkpoint on the CPU (a smoke check of the script, not a measurement):

    python benchmarks/bench_stage1.py --per_video --family qwen2_5_vl --expressions 1 5 16 --answer_tokens 4

Prints a table; never asserts a time.
"""
from __future__ import annotations

import argparse
import gc
from collections import defaultdict
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.adapters.base import AdapterOptions
from model.attention.capture import Tee
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.attention.rollout import make_rollout
from model.utils.atomic import atomic_write_json, library_versions

#: the repository's 40 test frames; docs/benchmarks.md's numbers used the first frames of the full clip (--frames_dir)
BEDROOM = REPO / "tests" / "data" / "bedroom"
EXPRESSION = "the person walking to the bed"


def family_setup(family: str, workdir: Path) -> tuple[type, Path, Any]:
    """(adapter class, tiny checkpoint with the real processor, full-size config) of a family."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from model.adapters.qwen import QwenVLAdapter
        from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint, reference_config
        ckpt = build_tiny_qwen_checkpoint(workdir / family, family, real_vocab=True, num_layers=1)
        return QwenVLAdapter, ckpt, reference_config(family)
    if family == "qwen3_vl":
        from model.adapters.qwen3_vl import Qwen3VLAdapter
        from model.selftest.tiny.qwen3_vl import build_tiny_qwen3_vl_checkpoint, reference_config
        return Qwen3VLAdapter, build_tiny_qwen3_vl_checkpoint(workdir / family, real_vocab=True), reference_config()
    if family == "llava_onevision":
        from model.adapters.llava_onevision import LlavaOnevisionAdapter
        from model.selftest.tiny.llava_onevision import build_tiny_llava_onevision_checkpoint, reference_config
        return (LlavaOnevisionAdapter, build_tiny_llava_onevision_checkpoint(workdir / family, real_vocab=True),
                reference_config())
    if family == "internvl":
        from model.adapters.internvl import InternVLAdapter
        from model.selftest.tiny.internvl import build_tiny_internvl_checkpoint, reference_config
        return InternVLAdapter, build_tiny_internvl_checkpoint(workdir / family, real_vocab=True), reference_config()
    raise SystemExit(f"unknown family {family}")


def full_size_adapter(family: str, workdir: Path):
    """An adapter whose model is the full-size architecture (random bf16 weights on the GPU)."""
    adapter_class, ckpt, config = family_setup(family, workdir)
    adapter = adapter_class(ckpt, device="cuda", precision="bf16", attn_implementation="sdpa",
                            options=AdapterOptions())
    model_class = type(adapter.model)
    del adapter.model
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_class._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    adapter.model = model.eval()
    adapter.num_layers = config.get_text_config().num_hidden_layers
    return adapter


def sample_frames(folder: Path, count: int) -> list[Path]:
    """``count`` frames spread over the folder's frames (the bedroom clip: 200 frames of 960×540)."""
    available = sorted(folder.glob("*.jpg"))
    step = max(1, len(available) // count)
    return [available[(i * step) % len(available)] for i in range(count)]


def measure_modes(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Time several ways of running the same call, interleaved so clock and thermal drift hit them alike.

    Each mode gets one warm-up; then ``repeats`` rounds run every mode once. Reported: median and minimum seconds,
    and the peak GPU memory above the loaded model (from one extra run per mode).
    """
    results: dict[str, dict[str, Any]] = {}
    for mode, fn in list(fns.items()):
        try:
            fn()
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            results[mode] = {"seconds": None, "min_seconds": None, "peak_extra_gib": None, "oom": True}
            del fns[mode]
            gc.collect()
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {mode: [] for mode in fns}
    for _ in range(repeats):
        for mode, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)
    for mode, fn in fns.items():
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        results[mode] = {"seconds": statistics.median(times[mode]), "min_seconds": min(times[mode]),
                         "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
    return results


def run_call(pipeline: PromptingPipeline, batch, mode: str) -> None:
    model = pipeline.adapter.model
    with torch.inference_mode():
        if mode == "plain":
            model(**batch.inputs, use_cache=False, logits_to_keep=1)
            return
        rollout = make_rollout(mode, batch.visual_mask, batch.key_mask)
        with pipeline.capture.armed(rollout, batch.seq_len):
            model(**batch.inputs, use_cache=False, logits_to_keep=1)
        rollout.rows()


def streamed_vs_literal(pipeline: PromptingPipeline, batch) -> float:
    """max |streamed − literal| / max |literal| over the rows of one real forward (T1 metric)."""
    streamed = make_rollout("streamed", batch.visual_mask, batch.key_mask)
    literal = make_rollout("literal", batch.visual_mask, batch.key_mask)
    with torch.inference_mode(), pipeline.capture.armed(Tee(streamed, literal), batch.seq_len):
        pipeline.adapter.model(**batch.inputs, use_cache=False, logits_to_keep=1)
    a, b = streamed.rows(), literal.rows()
    return float((a - b).abs().max() / b.abs().max())


def measure_one(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    return measure_modes({"only": fn}, repeats)["only"]


def time_once(fn: Callable[[], Any]) -> dict[str, Any]:
    """One timed run (for whole expressions, whose kernels are already compiled by the calls above)."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start,
            "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimeSplit:
    """Where one run's time goes: vision tower, LLM prefills of shared prefixes, other LLM prefills (the suffixes
    on the shared path, whole calls on the unshared one; both include capture and the streamed rollout, which run
    inside the captured layers), single-token decoding steps, the maps taken from the rollouts, and the rest
    (building inputs on the CPU, tokenising, cache copies). Forward hooks and wrappers synchronise the device at
    each boundary, so this runs once, apart from the timed repeats."""

    def __init__(self, pipeline: PromptingPipeline):
        self.pipeline, self.device = pipeline, pipeline.adapter.device
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles: list[Any] = []
        self._in_prefix = False
        self._clock: dict[str, float] = {}

    def _sync(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _hook(self, module: torch.nn.Module, kind: Callable[[tuple, dict], str]) -> None:
        def before(_module, args, kwargs):
            self._clock[id(_module)] = self._sync()

        def after(_module, args, kwargs, _output):
            self.seconds[kind(args, kwargs)] += self._sync() - self._clock.pop(id(_module))

        self._handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                          module.register_forward_hook(after, with_kwargs=True)]

    def _llm_kind(self, args: tuple, kwargs: dict) -> str:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = (embeds if embeds is not None else ids).shape[1]
        if self._in_prefix:
            return "prefix prefills"
        return "decoding steps" if length == 1 else "other prefills"

    def __enter__(self) -> "TimeSplit":
        model = self.pipeline.adapter.model
        vision = next(m for name, m in model.named_modules()
                      if name.split(".")[-1] in ("visual", "vision_tower", "vision_model"))
        llm = next(m for name, m in model.named_modules() if name.split(".")[-1] == "language_model")
        self._hook(vision, lambda args, kwargs: "vision tower")
        self._hook(llm, self._llm_kind)
        pipeline = self.pipeline
        new_prefix, maps = pipeline._new_prefix, pipeline._maps

        def timed_prefix(*args, **kwargs):
            self._in_prefix = True
            try:
                return new_prefix(*args, **kwargs)
            finally:
                self._in_prefix = False

        def timed_maps(*args, **kwargs):
            start = self._sync()
            try:
                return maps(*args, **kwargs)
            finally:
                self.seconds["maps from rollouts"] += self._sync() - start

        pipeline._new_prefix, pipeline._maps = timed_prefix, timed_maps
        self._start = self._sync()
        return self

    def __exit__(self, *exc: Any) -> None:
        total = self._sync() - self._start
        for handle in self._handles:
            handle.remove()
        del self.pipeline._new_prefix, self.pipeline._maps  # the class's methods again
        # the vision tower and the language model are sibling modules: the parts do not overlap
        self.seconds["rest (inputs on the CPU, tokenising, cache copies)"] = total - sum(self.seconds.values())
        self.seconds["total"] = total


def per_video(args: argparse.Namespace) -> dict[str, Any]:
    """Per-expression stage-1 time with and without per-video prefix sharing (SPEC §5.8f)."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            adapter_class, ckpt, _ = family_setup(args.family, Path(tmp))
            adapter = adapter_class(ckpt, device="cpu", precision="fp32", attn_implementation="sdpa",
                                    options=AdapterOptions(attn_max_token=16))
        else:
            adapter = full_size_adapter(args.family, Path(tmp))
    device = adapter.device
    start, end = adapter.num_layers // 2, adapter.num_layers
    frames = sample_frames(args.frames_dir, args.per_video_frames)
    results: dict[str, Any] = {"family": args.family, "tiny": args.tiny, "frames": len(frames), "layers": [start, end],
                               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "versions": library_versions(), "rows": []}

    def pipeline_of(tokens: int, shared: bool) -> PromptingPipeline:
        return PromptingPipeline(adapter, PipelineSettings(layer_start=start, layer_end=end, attn_max_batch=4,
                                                           max_new_tokens=tokens, share_prefix=shared))

    for tokens in args.answer_tokens:
        for count in args.expressions:
            expressions = [f"{EXPRESSION} number {i}" for i in range(count)]
            for shared in (True, False):
                # the unshared cost of an expression does not depend on its video's expression count: time a few
                timed = expressions if shared else expressions[:min(count, args.unshared_expressions)]
                pipeline = pipeline_of(tokens, shared)
                pipeline.run(frames[:2], "warm-up")  # kernels compiled, allocator warm
                per_expression, peak = [], None
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    synchronize(device)
                    clock = time.perf_counter()
                    if shared:
                        pipeline.run_video(frames, timed)
                    else:
                        for expression in timed:
                            pipeline.run(frames, expression)
                    synchronize(device)
                    per_expression.append((time.perf_counter() - clock) / len(timed))
                    if device.type == "cuda":
                        peak = max(peak or 0.0, (torch.cuda.max_memory_allocated() - base) / 2**30)
                stats = dict(pipeline.prefix_stats)
                split = None
                if args.time_split:
                    with TimeSplit(pipeline) as timer:
                        if shared:
                            pipeline.run_video(frames, timed)
                        else:
                            for expression in timed:
                                pipeline.run(frames, expression)
                    split = {k: v / len(timed) for k, v in timer.seconds.items()}
                pipeline.capture.detach()
                row = {"answer_tokens": tokens, "expressions": count, "path": "shared" if shared else "unshared",
                       "timed_expressions": len(timed), "seconds_per_expression": statistics.median(per_expression),
                       "min": min(per_expression), "max": max(per_expression), "peak_extra_gib": peak,
                       "prefix_prefills_per_repeat": stats["prefixes"] // args.repeats,
                       "continued_calls_per_repeat": stats["continued"] // args.repeats,
                       "time_split_seconds_per_expression": split}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # after every row: a run cut off by the device's time limit keeps what it measured
                    atomic_write_json(args.out, results)
    print(f"\n{args.family}{' (tiny, CPU smoke check)' if args.tiny else ''} on {results['device']}, "
          f"{len(frames)} frames, capture [{start}, {end})")
    print("| answer tokens | expressions/video | unshared s/expr | shared s/expr (min–max) | speed-up | "
          "shared peak GiB |")
    print("|---|---|---|---|---|---|")
    rows = {(r["answer_tokens"], r["expressions"], r["path"]): r for r in results["rows"]}
    for tokens in args.answer_tokens:
        for count in args.expressions:
            a, b = rows[(tokens, count, "unshared")], rows[(tokens, count, "shared")]
            peak = "-" if b["peak_extra_gib"] is None else f"{b['peak_extra_gib']:.2f}"
            speedup = a["seconds_per_expression"] / b["seconds_per_expression"]
            print(f"| {tokens} | {count} | {a['seconds_per_expression']:.3f} | {b['seconds_per_expression']:.3f} "
                  f"({b['min']:.3f}–{b['max']:.3f}) | {speedup:.2f}× | {peak} |")
    for row in results["rows"]:
        if row["time_split_seconds_per_expression"]:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in row["time_split_seconds_per_expression"].items())
            print(f"time split, s per expression ({row['answer_tokens']} tokens, {row['expressions']} expressions, "
                  f"{row['path']}): {parts}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 4, 8], help="frame-pass chunk sizes")
    parser.add_argument("--modes", nargs="+", default=["plain", "streamed", "literal"])
    parser.add_argument("--literal_max_tokens", type=int, default=14000,
                        help="skip the literal rollout above this sequence length (it needs B·H·L² fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--expression", action="store_true",
                        help="also time one whole expression (5 calls): ours vs the paper-style path")
    parser.add_argument("--decode_tokens", type=int, default=8,
                        help="fixed answer length for the whole-expression timing (random weights never stop)")
    parser.add_argument("--frames_dir", type=Path, default=BEDROOM,
                        help="folder of JPEG frames (default: tests/data/bedroom, 40 frames)")
    parser.add_argument("--out", default=None,
                        help="write the results as JSON here (--per_video: rewritten after every row)")
    parser.add_argument("--per_video", action="store_true",
                        help="time stage 1 per expression, shared per-video prefixes vs unshared (SPEC §5.8f)")
    parser.add_argument("--expressions", type=int, nargs="+", default=[1, 5, 16],
                        help="--per_video: expressions per video")
    parser.add_argument("--answer_tokens", type=int, nargs="+", default=[4, 128],
                        help="--per_video: fixed answer lengths (random weights never stop)")
    parser.add_argument("--per_video_frames", type=int, default=16, help="--per_video: sampled frames T")
    parser.add_argument("--unshared_expressions", type=int, default=2,
                        help="--per_video: expressions timed on the unshared path (its cost per expression does "
                             "not depend on the count)")
    parser.add_argument("--time_split", action="store_true",
                        help="--per_video: one more run per cell with the time split into vision tower, prefix "
                             "prefills, other prefills, decoding steps, maps and the rest (synchronising, so apart "
                             "from the timed repeats)")
    parser.add_argument("--tiny", action="store_true",
                        help="--per_video on the family's tiny checkpoint on the CPU: a smoke check of the script")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.per_video:
        per_video(args)
        return

    results: dict[str, Any] = {"family": args.family, "device": torch.cuda.get_device_name(),
                               "torch": torch.__version__, "calls": [], "expression": []}
    import transformers
    results["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        adapter = full_size_adapter(args.family, Path(tmp))
    start, end = adapter.num_layers // 2, adapter.num_layers
    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=start, layer_end=end))
    results["layers"] = [start, end]
    print(f"{args.family}: {adapter.num_layers} layers, capture [{start}, {end}), device {results['device']}",
          flush=True)

    for count in args.frames:
        frames = sample_frames(args.frames_dir, count)
        video = adapter.video_batch(frames, "what is it?")
        passes = [("video", count, video)]
        passes += [(f"frames x{b}", count, adapter.frame_batch(frames[:b], "what is it?", video)) for b in args.chunks
                   if count == args.frames[0]]
        for name, n_frames, batch in passes:
            row: dict[str, Any] = {"call": name, "frames": n_frames, "batch": int(batch.visual_mask.shape[0]),
                                   "tokens": batch.seq_len, "visual_tokens": int(batch.visual_mask[0].sum())}
            fns = {}
            for mode in args.modes:
                if mode == "literal" and batch.seq_len > args.literal_max_tokens:
                    row[mode] = {"seconds": None, "peak_extra_gib": None, "skipped": True}
                else:
                    fns[mode] = (lambda m=mode, b=batch: run_call(pipeline, b, m))
            row.update(measure_modes(fns, args.repeats))
            if batch.seq_len <= args.literal_max_tokens:
                try:
                    row["rel_error"] = streamed_vs_literal(pipeline, batch)
                except torch.OutOfMemoryError:
                    row["rel_error"] = None
            results["calls"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()

    # call 3: text only, greedy decoding of a fixed number of tokens (random weights never stop)
    from model.attention import prompts
    pipeline.capture.detach()
    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=start, layer_end=end,
                                                          max_new_tokens=args.decode_tokens))
    q = prompts.preprocess_expression(EXPRESSION)
    choice = prompts.choice_prompt(q, ["person"] * 17)
    row = {"call": f"text (call 3, {args.decode_tokens} new tokens)", "frames": 0, "batch": 1,
           "tokens": int(adapter.text_inputs(choice)["input_ids"].shape[1]), "visual_tokens": 0,
           "plain": measure_one(lambda: pipeline.generate_text(choice), args.repeats)}
    results["calls"].append(row)
    print(json.dumps(row), flush=True)

    if args.expression:
        frames = sample_frames(args.frames_dir, 16)
        for label, overrides in (("ours (streamed, decode calls 1-3)", {}),
                                 ("paper-style (literal, decode all)",
                                  {"rollout_impl": "literal", "save_bg_captions": True})):
            settings = PipelineSettings(layer_start=start, layer_end=end, attn_max_batch=4,
                                        max_new_tokens=args.decode_tokens, **overrides)
            pipeline.capture.detach()
            pipeline = PromptingPipeline(adapter, settings)
            row = {"path": label, **time_once(lambda: pipeline.run(frames, EXPRESSION))}
            results["expression"].append(row)
            print(json.dumps(row), flush=True)

    print_table(results)
    if args.out:
        atomic_write_json(args.out, results)


def print_table(results: dict[str, Any]) -> None:
    def fmt(entry: dict[str, Any] | None, key: str) -> str:
        if not entry or entry.get(key) is None:
            return "OOM" if entry and entry.get("oom") else "-"
        return f"{entry[key]:.3f}"

    print(f"\n{results['family']} on {results['device']} (torch {results['torch']}, "
          f"transformers {results['transformers']})")
    print("| call | frames | batch | tokens | plain s | streamed s (×) | literal s (×) | plain GiB | streamed GiB | "
          "literal GiB | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results["calls"]:
        plain = row.get("plain", {}).get("seconds")

        def ratio(mode: str) -> str:
            sec = (row.get(mode) or {}).get("seconds")
            return f"{fmt(row.get(mode), 'seconds')} ({sec / plain:.2f}×)" if sec and plain else fmt(row.get(mode),
                                                                                                    "seconds")
        error = row.get("rel_error")
        print(f"| {row['call']} | {row['frames']} | {row['batch']} | {row['tokens']} | {fmt(row.get('plain'), 'seconds')}"
              f" | {ratio('streamed')} | {ratio('literal')} | {fmt(row.get('plain'), 'peak_extra_gib')} | "
              f"{fmt(row.get('streamed'), 'peak_extra_gib')} | {fmt(row.get('literal'), 'peak_extra_gib')} | "
              f"{'-' if error is None else f'{error:.1e}'} |")
    for row in results["expression"]:
        print(f"expression, {row['path']}: {fmt(row, 'seconds')} s, peak extra {fmt(row, 'peak_extra_gib')} GiB")


if __name__ == "__main__":
    main()
