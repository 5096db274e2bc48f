"""The offline preset: tiny random-weight checkpoints of the real classes in one folder, and the settings that let the
demo, the API and the self-test run on them in about a minute on a laptop CPU.

``python -m model.selftest --make_ckpts ckpts/tiny`` writes the folder; ``python demo.py --tiny …`` and
``segment(..., tiny=True)`` use it (and write it first if it is missing, :func:`ensure_tiny_checkpoints`). The
folder holds a Qwen2.5-VL checkpoint (the stock transformers class with 28 LLM layers, so that the paper's start
layer 14 is "auto"), a Hiera-T SAM2 at 256 px and ``tiny_checkpoints.json``, which says how to load them. The
weights are random: the masks mean nothing, the pipeline is the real one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from model.utils.atomic import atomic_write_text
from model.utils.errors import DecafError

#: where ``--tiny`` looks for (and writes) the checkpoints by default
DEFAULT_TINY_CKPTS = Path("ckpts/tiny")
DESCRIPTION_FILE = "tiny_checkpoints.json"
DISCLAIMER = "random weights: the masks are meaningless; this only shows that the pipeline runs"
LLM_LAYERS = 28  # as Qwen2.5-VL-7B: the scripts' start layer 14 is then half the depth
SAM2_IMAGE_SIZE = 256
#: method settings of a tiny run: token budgets small enough for a CPU, fp32 for exact arithmetic
TINY_SETTINGS = {"num_input_frames": 4, "attn_max_token": 16, "max_new_tokens": 4}
TINY_PRECISION = "fp32"


@dataclass(frozen=True)
class TinyCheckpoints:
    """Where the tiny checkpoints are and how SAM2 must be built to load them."""

    folder: Path
    version: Path  # the MLLM checkpoint folder
    vision_pretrained: Path  # the SAM2 checkpoint file
    vision_pretrained_config: str  # the SAM2 config name
    sam2_overrides: tuple[str, ...]  # Hydra overrides for the 256-px image size


def tiny_layout(folder: str | os.PathLike) -> TinyCheckpoints:
    """Where :func:`make_tiny_checkpoints` puts the checkpoints in ``folder`` (nothing is read or built)."""
    folder = Path(folder)
    return TinyCheckpoints(folder, folder / "tiny-Qwen2.5-VL",
                           folder / "tiny-sam2" / f"sam2_hiera_tiny_{SAM2_IMAGE_SIZE}.pt", "sam2_hiera_t.yaml",
                           (f"++model.image_size={SAM2_IMAGE_SIZE}",))


def make_tiny_checkpoints(folder: str | os.PathLike) -> TinyCheckpoints:
    """Build both tiny checkpoints into ``folder`` and describe them in ``tiny_checkpoints.json`` (written last, so
    its presence means the folder is complete)."""
    from transformers.utils import logging as transformers_logging

    from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
    from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint

    tiny = tiny_layout(folder)
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar for a few kilobytes
    build_tiny_qwen_checkpoint(tiny.version, "qwen2_5_vl", num_layers=LLM_LAYERS)
    config, overrides = build_tiny_sam2_checkpoint(tiny.vision_pretrained, image_size=SAM2_IMAGE_SIZE)
    if (config, tuple(overrides)) != (tiny.vision_pretrained_config, tiny.sam2_overrides):
        raise RuntimeError(f"tiny SAM2 built as {config} {overrides}, but tiny_layout() says otherwise")
    description = {"version": tiny.version.name,
                   "vision_pretrained": str(tiny.vision_pretrained.relative_to(tiny.folder)),
                   "vision_pretrained_config": config, "sam2_overrides": list(overrides), "note": DISCLAIMER}
    atomic_write_text(tiny.folder / DESCRIPTION_FILE, json.dumps(description, indent=1) + "\n")
    return tiny


def ensure_tiny_checkpoints(folder: str | os.PathLike = DEFAULT_TINY_CKPTS) -> TinyCheckpoints:
    """The tiny checkpoints in ``folder``, built there first if the folder holds none yet."""
    tiny = tiny_layout(folder)
    if not (tiny.folder / DESCRIPTION_FILE).exists():
        print(f"building tiny random-weight checkpoints in {tiny.folder} (once, a few seconds) …", flush=True)
        return make_tiny_checkpoints(tiny.folder)
    for needed in (tiny.version, tiny.vision_pretrained):
        if not needed.exists():
            raise DecafError(f"{needed} is missing; rebuild the tiny checkpoints with "
                             f"`python -m model.selftest --make_ckpts {tiny.folder}`")
    return tiny
