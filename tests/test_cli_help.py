"""Every script's ``--help`` runs and explains every flag (the user-facing contract of SPEC §13)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

SCRIPTS = ["evaluation/inference_attn_map_qwenvl.py", "evaluation/inference_attn_map_llavaov.py",
           "evaluation/inference_attn_map_internvl.py", "evaluation/inference_attn_map_qwen3vl.py",
           "inference_attn_mask.py", "inference_keypoints.py", "demo.py", "data_reformat_reasonvos.py",
           "evaluation/eval_rvos.py", "evaluation/eval_rvos_obj_iou.py", "evaluation/eval_rvos_keypoints.py",
           "evaluation/zip_refvos_results.py", "evaluation/run_pipeline.py"]


def undocumented_options(help_text: str) -> list[str]:
    """Options of an argparse help page that carry no help text.

    argparse prints the help after two or more spaces on the option's line, or, for a long option, on the next
    line indented further; metavars never contain two spaces in a row.
    """
    lines = help_text.splitlines()
    missing = []
    for index, line in enumerate(lines):
        if not re.match(r"^  -", line):
            continue
        if re.search(r"\S {2,}\S", line.strip()):
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if not (re.match(r"^ {10,}\S", following) and not following.strip().startswith("-")):
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_flag(script):
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n  -") >= 2
    assert undocumented_options(result.stdout) == []


def test_the_checker_finds_an_undocumented_flag():
    page = "options:\n  -h, --help  show this help message and exit\n  --quiet\n  --long_flag_name LONG_FLAG_NAME\n" \
           "                        explained\n"
    assert undocumented_options(page) == ["--quiet"]


def imported_modules(script: str, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run a script with ``-X importtime`` and return its result and the top-level modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), *args], capture_output=True,
                            text=True, env=subprocess_env(), timeout=120)
    modules = {match.group(1).split(".")[0]
               for match in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", result.stderr, re.M)}
    return result, modules


@pytest.mark.parametrize("script", [s for s in SCRIPTS if "inference" in s or s == "demo.py"])
def test_help_and_flag_errors_answer_before_torch_loads(script):
    """``--help`` and a bad flag value are answered by the parser alone; torch and the models load after it."""
    result, modules = imported_modules(script, "--help")
    assert result.returncode == 0 and "torch" not in modules and "transformers" not in modules
    result, modules = imported_modules(script, "--dataset", "davis", "--version", "v", "--video_path", "v",
                                       "--exp", "e", "--attn_layer_idx_start", "half")
    assert result.returncode == 2 and "torch" not in modules, result.stderr[-2000:]
    assert "--attn_layer_idx_start" in result.stderr.splitlines()[-1]
