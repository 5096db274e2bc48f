"""The install self-test (``python -m model.selftest``): the Ref-DAVIS run script end to end with tiny random-weight
checkpoints on a synthetic one-video benchmark in the reference layout, with a two-entry GPU list on CPU (two
shards per inference step). The test checks the outputs itself, independently of the self-test's own checks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import subprocess_env
from model.selftest.run import DISCLAIMER

RUN = Path("qwen2-5-vl-7b-rvos/F4_L14--1")


def run_selftest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env(TMPDIR=str(cwd))
    return subprocess.run([sys.executable, "-m", "model.selftest", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_selftest_runs_the_script_end_to_end_with_two_shards(tmp_path):
    work = tmp_path / "work"
    result = run_selftest("--workdir", str(work), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "self-test passed" in result.stdout and DISCLAIMER in result.stdout

    caches = sorted(p.name for p in (work / "attn_weights" / RUN / "davis_valid").glob("*.safetensors"))
    assert caches == ["sample_clip_0.safetensors", "sample_clip_1.safetensors"]
    outputs = work / "outputs" / RUN
    for exp_id in ("0", "1"):
        coarse = sorted((outputs / "inf-uniform-F4-attn-mask/davis_valid/sample_clip" / exp_id).glob("*.png"))
        assert [p.stem for p in coarse] == ["00000", "00002", "00004", "00007"]  # T = 4 of F = 8
        sam = sorted((outputs / "inf-uniform-F4-sam-mask/davis_valid/sample_clip" / exp_id).glob("*.png"))
        assert [p.stem for p in sam] == [f"{i:05d}" for i in range(8)]
        with Image.open(sam[0]) as image:
            assert image.mode == "L" and image.size == (960, 540)
            assert set(np.unique(np.asarray(image))) <= {0, 255}
    logs = sorted(p.name for p in (outputs / "logs").iterdir())
    assert "davis_valid_attn-map_shard0-of-2.log" in logs and "davis_valid_attn-map_shard1-of-2.log" in logs
    for kind in ("attn-mask", "sam-mask"):
        metrics = work / "metrics" / RUN / f"inf-uniform-F4-{kind}"
        summary = json.loads((metrics / "davis_valid.json").read_text())
        assert set(summary["overall"]) == {"J", "F", "JF"}
        assert json.loads((metrics / "davis_valid.failures.json").read_text()) == []
        assert (metrics / "davis_valid.csv").read_text().count("\n") == 3  # header + 2 expressions


def test_selftest_failures_exit_non_zero_with_one_line(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    result = run_selftest("--workdir", str(busy), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "not empty" in result.stderr

    # the script cannot finish in 1 s: the failure names the cause and keeps the work folder
    result = run_selftest("--timeout", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "did not finish within 1 s" in result.stderr and "work folder kept" in result.stderr
    assert "self-test passed" not in result.stdout
