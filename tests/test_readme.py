"""The README cannot drift: its Python example and its offline commands run here, its links point at files, and
every "SPEC §n" citation in the repository resolves to a section (or numbered item) of docs/SPEC.md."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

README = REPO / "README.md"
SPEC = REPO / "docs" / "SPEC.md"
#: the marker line above a README code block whose commands this test runs
TESTED_BLOCK = "<!-- README test:"
CITATION = re.compile(r"§(\d+)(?:\.(\d+))?([a-z])?(?![\d.])")


def code_blocks(text: str, language: str) -> list[tuple[str, str]]:
    """(line before the block, block body) of every fenced block in ``language``."""
    return [(match.group(1), match.group(2)) for match in
            re.finditer(rf"(?:^([^\n]*)\n)?```{language}\n(.*?)^```", text, re.M | re.S)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty folder laid out like a checkout for a user's commands: the scripts and assets linked in, and the tiny
    checkpoints at ``ckpts/tiny``, built once for the module."""
    from model.selftest.tiny.preset import make_tiny_checkpoints

    folder = tmp_path_factory.mktemp("readme")
    for name in ("demo.py", "assets", "model", "evaluation"):
        (folder / name).symlink_to(REPO / name)
    make_tiny_checkpoints(folder / "ckpts" / "tiny")
    return folder


def test_readme_python_example_runs(workdir):
    (_, example), = code_blocks(README.read_text(), "python")
    result = subprocess.run([sys.executable, "-c", example], cwd=workdir, capture_output=True, text=True,
                            env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    masks_shape, phi_shape, _name = result.stdout.strip().splitlines()
    assert masks_shape == "(8, 540, 960)"  # the 8-frame sample clip at 960×540
    assert re.fullmatch(r"torch\.Size\(\[4, \d+, \d+\]\)", phi_shape)  # T = 4 sampled frames with --tiny settings
    assert "random weights" in result.stderr  # the tiny preset says what it is


def test_readme_offline_commands_run(workdir):
    blocks = [body for marker, body in code_blocks(README.read_text(), "bash") if marker.startswith(TESTED_BLOCK)]
    assert len(blocks) == 1
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert commands[0].startswith("python -m model.selftest --make_ckpts ckpts/tiny")
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        result = subprocess.run([sys.executable, *argv[1:]], cwd=workdir, capture_output=True, text=True,
                                env=subprocess_env(), timeout=600)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    out = workdir / "results" / "decaf_demo"
    assert (out / "sample_clip_all.png").is_file() and (out / "sample_clip_sam_mask.mp4").is_file()
    assert len(list((out / "sample_clip" / "masks").glob("*.png"))) == 8


def test_readme_links_point_at_files():
    for target in re.findall(r"\]\(([^)#:]+)\)", README.read_text()):
        assert (REPO / target).exists(), target


def spec_sections() -> tuple[set[str], dict[str, set[str]]]:
    """Headings "n" and "n.m" of docs/SPEC.md, and per section the numbered and lettered items in its text."""
    headings: set[str] = set()
    items: dict[str, set[str]] = {}
    current = None
    for line in SPEC.read_text().splitlines():
        heading = re.match(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", line)
        if heading:
            current = heading.group(1)
            headings.add(current)
            items[current] = set()
            continue
        if current is not None:
            item = re.match(r"^\s*(\d+)\. ", line) or re.match(r"^\s*\* \*\*\(([a-z])\)", line)
            if item:
                items[current].add(item.group(1))
    return headings, items


def test_every_spec_citation_resolves():
    headings, items = spec_sections()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    unresolved = []
    for name in tracked:
        path = REPO / name
        if path == SPEC or path.suffix not in (".py", ".md", ".sh", ".toml") or not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "SPEC" not in line and "§" not in line:
                continue
            for major, minor, letter in CITATION.findall(line):
                section = f"{major}.{minor}" if minor else major
                if section in headings:
                    ok = not letter or letter in items[section]
                else:  # "§7.2": numbered item 2 of a section without sub-headings
                    ok = major in headings and minor in items.get(major, set()) and not letter
                if not ok:
                    unresolved.append(f"{name}: §{section}{letter}")
    assert not unresolved, sorted(set(unresolved))
