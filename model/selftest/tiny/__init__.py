"""Tiny random-weight checkpoints of the real model classes, for tests and the install self-test."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def save_random_checkpoint(path: str | Path, model_class: type, config: Any, processor: Any,
                           generation_config: Any, seed: int) -> Path:
    """Build ``model_class(config)`` with weights that depend only on ``seed`` and save it, its generation config
    and ``processor`` into ``path`` in one atomic step, laid out like a released checkpoint (``from_pretrained``
    then loads it through the same code path as a user's). The global RNG state is left untouched."""
    import torch

    from model.utils.atomic import atomic_directory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config = generation_config
    with atomic_directory(path) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return Path(path)
