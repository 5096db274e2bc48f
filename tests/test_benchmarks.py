"""The benchmark scripts run (device time is scarce: a script error must show up here, not on the GPU machine).

Only the per-video stage-1 benchmark has a CPU mode (``--tiny``); it is run as a user runs it, and what it records is
checked against the work the pipeline must do. Its times are never asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def test_per_video_benchmark_records_every_row_with_its_time_split(tmp_path):
    out = tmp_path / "per_video.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_stage1.py"), "--per_video", "--tiny",
               "--per_video_frames", "4", "--expressions", "2", "--answer_tokens", "2", "--repeats", "1",
               "--unshared_expressions", "1", "--time_split", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["tiny"] and record["frames"] == 4 and record["versions"]["torch"]
    rows = {row["path"]: row for row in record["rows"]}
    assert set(rows) == {"shared", "unshared"}
    # 4 frames at attn_max_batch 4: one video input and one frame chunk, each prefilled once per repeat (SPEC §5.8f);
    # every expression continues 4 calls after them (video and frames, object and background prompts)
    assert rows["shared"]["prefix_prefills_per_repeat"] == 2
    assert rows["shared"]["continued_calls_per_repeat"] == 2 * 4
    assert rows["unshared"]["prefix_prefills_per_repeat"] == rows["unshared"]["continued_calls_per_repeat"] == 0
    assert rows["unshared"]["timed_expressions"] == 1 and rows["shared"]["timed_expressions"] == 2
    for path, row in rows.items():
        split = row["time_split_seconds_per_expression"]
        assert ("prefix prefills" in split) == (path == "shared")
        assert split["vision tower"] > 0 and split["decoding steps"] > 0 and split["maps from rollouts"] > 0
        assert split["total"] > 0 and row["seconds_per_expression"] > 0
    assert "| 2 | 2 |" in result.stdout  # the printed table names the cell (answer tokens, expressions per video)
