"""Per-video prefix sharing (SPEC §5.8f) on tiny checkpoints of every family, CPU fp32.

One video, three expressions: :meth:`PromptingPipeline.run_video` (each visual input's prefix prefilled once, every
call continued after it) must give the maps of the unshared path (``run`` per expression) and of the literal
oracle within T1, and the same greedy answers — chunked and unchunked frame passes, an odd T, two prompt versions.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from conftest import copy_frames
from model.adapters.base import AdapterOptions
from model.adapters.internvl import InternVLAdapter
from model.adapters.llava_onevision import LlavaOnevisionAdapter
from model.adapters.qwen import QwenVLAdapter
from model.adapters.qwen3_vl import Qwen3VLAdapter
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.selftest.tiny.internvl import build_tiny_internvl_checkpoint
from model.selftest.tiny.llava_onevision import build_tiny_llava_onevision_checkpoint
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
from model.selftest.tiny.qwen3_vl import build_tiny_qwen3_vl_checkpoint
from test_adapters_llava_internvl import LLAVA_FRAME_WH, resized_copies
from test_stage1_qwen import assert_t1

EXPRESSIONS = ("the bed", "a lamp on the left", "What is next to the window?")
SMALL = AdapterOptions(attn_max_token=16)
FAMILIES = {
    "qwen2_vl": (QwenVLAdapter, lambda root: build_tiny_qwen_checkpoint(root, "qwen2_vl")),
    "qwen2_5_vl": (QwenVLAdapter, lambda root: build_tiny_qwen_checkpoint(root, "qwen2_5_vl")),
    "qwen3_vl": (Qwen3VLAdapter, build_tiny_qwen3_vl_checkpoint),
    "llava_onevision": (LlavaOnevisionAdapter, build_tiny_llava_onevision_checkpoint),
    "internvl": (InternVLAdapter, build_tiny_internvl_checkpoint),
}


@pytest.fixture(scope="module")
def frames3(tmp_path_factory) -> dict[str, list[Path]]:
    """T = 3 (odd) bedroom frames; LLaVA-OV gets small copies (few anyres tiles)."""
    root = tmp_path_factory.mktemp("frames")
    native = copy_frames(root / "native", 3, step=8)
    return {"native": native, "small": resized_copies(native, root / "small", LLAVA_FRAME_WH)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    adapter_class, build = FAMILIES[request.param]
    checkpoint = build(tmp_path_factory.mktemp("ckpts") / request.param)
    return request.param, adapter_class(checkpoint, device="cpu", precision="fp32", attn_implementation="sdpa",
                                        options=SMALL)


def run_all(adapter, frames, shared: bool, **overrides):
    """All expressions of the video through one pipeline; the pipeline's prefix counters come back too."""
    settings = dict(layer_start=2, layer_end=4, attn_max_batch=2, max_new_tokens=2, share_prefix=shared)
    settings.update(overrides)
    pipeline = PromptingPipeline(adapter, PipelineSettings(**settings))
    try:
        if shared:
            results = pipeline.run_video(frames, EXPRESSIONS)
        else:
            results = [pipeline.run(frames, expression) for expression in EXPRESSIONS]
    finally:
        pipeline.capture.detach()
    return results, pipeline.prefix_stats


def assert_same(results, references) -> None:
    for result, reference in zip(results, references, strict=True):
        assert result.maps.keys() == reference.maps.keys()
        for name, oracle in reference.maps.items():
            assert_t1(result.maps[name], oracle)
        assert result.texts == reference.texts  # greedy answers, obj_name included
        assert result.prompts == reference.prompts


def frames_of(name: str, frames3: dict[str, list[Path]]) -> list[Path]:
    return frames3["small" if name == "llava_onevision" else "native"]


def test_shared_prefix_equals_unshared_literal(family, frames3):
    """Chunked frame passes (2 + 1 frames), prompt versions 0: T1 against the unshared path with the literal
    oracle's rollout (the unshared streamed rollout equals the oracle in the rollout tests)."""
    name, adapter = family
    frames = frames_of(name, frames3)
    shared, stats = run_all(adapter, frames, shared=True)
    # every call but the first of each visual input continued after its prefix: 1 video + 2 frame chunks
    chunks = math.ceil(len(frames) / 2)
    assert stats == {"prefixes": 1 + chunks, "continued": len(EXPRESSIONS) * 2 * (1 + chunks), "unshared": 0}
    literal, unshared_stats = run_all(adapter, frames, shared=False, rollout_impl="literal")
    assert unshared_stats["prefixes"] == 0
    assert_same(shared, literal)


def test_shared_prefix_unchunked_other_prompt_versions(family, frames3):
    """All frames in one chunk, prompt versions 3 (the expression also in the background prompt), the literal
    rollout on the shared path: the unshared path's maps (streamed rollout) and answers."""
    name, adapter = family
    frames = frames_of(name, frames3)
    versions = dict(obj_version=3, bg_version=3, choice_version=1, attn_max_batch=len(frames))
    shared, stats = run_all(adapter, frames, shared=True, rollout_impl="literal", **versions)
    assert stats["prefixes"] == 2 and stats["unshared"] == 0
    unshared, _ = run_all(adapter, frames, shared=False, **versions)
    assert_same(shared, unshared)


def test_positions_continue_after_the_prefix(frames3, tmp_path):
    """Qwen2.5-VL video pass: the paper-rule M-RoPE positions of the whole sequence (SPEC §3.1) are what a
    continued call is fed, and a prefix is not shared with another visual input."""
    adapter = QwenVLAdapter(build_tiny_qwen_checkpoint(tmp_path / "q", "qwen2_5_vl"), device="cpu",
                            precision="fp32", attn_implementation="sdpa", options=SMALL)
    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=2, layer_end=4, max_new_tokens=2))
    try:
        frames = frames3["native"]
        batch = adapter.video_batch(frames, "the bed.")
        with pipeline.video_session():
            _, suffix = pipeline._text_split("the bed.", "video")
            entry = pipeline._new_prefix(batch, pipeline._text_split("the bed.", "video")[0], suffix)
            assert entry is not None and entry.ids.shape[1] == batch.seq_len - len(suffix)
            other = adapter.video_batch(frames, "a much longer expression about the lamp.")
            _, other_suffix = pipeline._text_split("a much longer expression about the lamp.", "video")
            inputs, continued = pipeline._continued(entry, other_suffix)
            assert torch.equal(inputs["position_ids"], other.inputs["position_ids"])
            assert torch.equal(inputs["input_ids"], other.inputs["input_ids"])
            assert torch.equal(continued.visual_mask, other.visual_mask)
            pipeline._pass("video", frames[:2], "the bed.", lambda: adapter.video_batch(frames[:2], "the bed."),
                           decode=False)
            assert pipeline.prefix_stats["prefixes"] == 2  # other frames: a prefix of their own
            # both prefixes are held until the session ends: KV cache, recorded queries and inputs
            assert pipeline.session_peak_bytes == sum(e.nbytes for e in pipeline._prefixes.values()) > 0
    finally:
        pipeline.capture.detach()


@pytest.mark.slow
def test_stage1_script_shares_per_video_and_matches_no_prefix_cache(tmp_path):
    """The stage-1 script runs a shard video by video (SPEC §10.9) with shared prefixes; ``--no_prefix_cache``
    (the reference path) writes the same maps and texts, and a resumed run skips finished expressions."""
    import subprocess
    import sys

    from conftest import REPO
    from model.cache import load_cache
    from test_stage1_qwen import make_davis

    checkpoint = build_tiny_qwen_checkpoint(tmp_path / "ckpt", "qwen2_vl")
    data = make_davis(tmp_path / "data", {"bedroom": (5, list(EXPRESSIONS)), "room": (3, ["chair"])})
    common = ["--dataset", "davis", "--data_root", str(data), "--version", str(checkpoint), "--model_name", "tiny",
              "--num_input_frames", "3", "--attn_max_token", "16", "--precision", "fp32", "--attn_max_batch", "2",
              "--max_new_tokens", "2", "--device", "cpu"]
    folders = {"shared": tmp_path / "shared", "unshared": tmp_path / "unshared"}

    def run(name: str, *extra: str) -> str:
        result = subprocess.run([sys.executable, str(REPO / "evaluation/inference_attn_map_qwenvl.py"), *common,
                                 "--attn_save_path", str(folders[name]), *extra], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    log = run("shared")
    # one memory line per video: what its shared prefixes held (the reference path holds none)
    held = [float(m) for m in re.findall(r"video (?:bedroom|room): \d job\(s\), shared prefixes held ([\d.]+) MiB",
                                         log)]
    assert len(held) == 2 and all(value > 0 for value in held)
    assert "shared prefixes held 0.00 MiB" in run("unshared", "--no_prefix_cache")
    names = sorted(p.name for p in folders["shared"].glob("*.safetensors"))
    assert names == ["bedroom_0.safetensors", "bedroom_1.safetensors", "bedroom_2.safetensors",
                     "room_0.safetensors"]
    for file_name in names:
        shared, unshared = load_cache(folders["shared"] / file_name), load_cache(folders["unshared"] / file_name)
        for key in ("obj_video", "obj_frame", "bg_video", "bg_frame"):
            assert_t1(getattr(shared, key), getattr(unshared, key))
        assert shared.meta["texts"] == unshared.meta["texts"]
        assert shared.meta["settings"] == unshared.meta["settings"]  # nothing new recorded: the maps are the same
    # resume in the middle of a video: only the missing expression runs, its prefix computed afresh
    stamp = (folders["shared"] / "bedroom_0.safetensors").stat().st_mtime_ns
    (folders["shared"] / "bedroom_1.safetensors").unlink()
    assert "1 to run" in run("shared")
    assert (folders["shared"] / "bedroom_0.safetensors").stat().st_mtime_ns == stamp
    resumed = load_cache(folders["shared"] / "bedroom_1.safetensors")
    assert_t1(resumed.bg_frame, load_cache(folders["unshared"] / "bedroom_1.safetensors").bg_frame)
