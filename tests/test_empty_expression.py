"""Empty and whitespace-only expressions (SPEC §2.1): a benchmark runs them as the paper did, live use refuses them.

The benchmark side (a stage-1 run over a meta file with "" and "   " expressions: computed, warned once, listed
in the manifest) is tested in ``test_reliability.py::test_bad_frame_folders_fail_their_jobs_and_the_run_goes_on``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, copy_frames
from model.adapters.base import AdapterOptions
from model.adapters.qwen import QwenVLAdapter
from model.api import Segmenter, SegmentSettings
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint
from model.utils.errors import DecafError

TINY = dict(num_input_frames=2, attn_max_token=16, max_new_tokens=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpts")
    config, overrides = build_tiny_sam2_checkpoint(root / "sam2.pt", image_size=256)
    return {"version": build_tiny_qwen_checkpoint(root / "qwen", "qwen2_5_vl", num_layers=2), "sam2": root / "sam2.pt",
            "config": config, "overrides": overrides}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames") / "clip"
    copy_frames(folder, 2, step=9)
    return folder


def test_pipeline_refuses_unless_asked_to_run_it(ckpts, clip):
    adapter = QwenVLAdapter(ckpts["version"], device="cpu", precision="fp32", options=AdapterOptions(attn_max_token=16))
    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=1, layer_end=2, max_new_tokens=2))
    frames = sorted(clip.glob("*.jpg"))
    try:
        for expression in ("", "   "):
            with pytest.raises(DecafError, match="the expression is empty"):
                pipeline.run(frames, expression)
        result = pipeline.run(frames, "", allow_empty=True)
    finally:
        pipeline.capture.detach()
    assert result.prompts["obj"].startswith(". \n")  # q = "" + "." (§2.1)
    assert result.maps["obj_video"].shape[0] == 1 and result.maps["obj_frame"].shape[0] == 2


def test_api_refuses_with_one_line(ckpts, clip):
    with Segmenter(ckpts["version"], ckpts["sam2"], ckpts["config"], settings=SegmentSettings(**TINY),
                   device="cpu", precision="fp32", sam2_overrides=ckpts["overrides"]) as segmenter:
        for expression in ("", " \n\t "):
            with pytest.raises(DecafError, match="the expression is empty") as caught:
                segmenter.segment(clip, expression)
            assert "\n" not in str(caught.value)


def test_demo_refuses_with_one_line(tmp_path, ckpts, clip):
    command = [sys.executable, str(REPO / "demo.py"), "--version", str(ckpts["version"]),
               "--vision_pretrained", str(ckpts["sam2"]), "--vision_pretrained_config", ckpts["config"],
               "--sam2_overrides", *ckpts["overrides"], "--precision", "fp32", "--device", "cpu",
               "--num_input_frames", "2", "--attn_max_token", "16", "--max_new_tokens", "2",
               "--video_path", str(clip), "--exp", "   ", "--vis_save_path", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: the expression is empty")
