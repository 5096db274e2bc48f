"""A tiny random-weight SAM2 checkpoint built from the package's own Hiera-T config (tests, self-test).

The model is the real ``SAM2VideoPredictor`` from the shipped SAM 2.0 ``sam2_hiera_t.yaml``, built with the
package's own video-predictor builder and saved as ``{"model": state_dict}`` exactly like a released checkpoint, so
:func:`model.sam.prompting.load_sam2_predictor` loads it through the same code path as the real Hiera-L. A smaller
``image_size`` (a hydra override that must also be passed when loading) keeps CPU tests fast: Hiera-T encodes a
frame in about 0.14 s at 256 px against 3–5 s at 1024 px.
"""
from __future__ import annotations

from pathlib import Path

import torch
from sam2.build_sam import build_sam2_video_predictor

from model.sam.predictor import resolve_sam2_config
from model.utils.atomic import atomic_write

#: the SAM 2.0 Hiera-T config shipped inside the ``sam2`` package
TINY_CONFIG = "sam2_hiera_t.yaml"
#: the image size of every shipped config; no override is needed at this size
DEFAULT_IMAGE_SIZE = 1024


def build_tiny_sam2_checkpoint(path: Path, image_size: int = 256, seed: int = 0,
                               config: str = TINY_CONFIG) -> tuple[str, list[str]]:
    """Write a random-weight Hiera-T checkpoint to ``path``; return ``(config name, hydra overrides)`` to load it.

    The weights depend only on ``seed`` (the global RNG state is left untouched). ``image_size`` must be a
    multiple of 32 (Hiera-T's total stride). ``config`` names another shipped config, e.g.
    ``sam2_hiera_l.yaml`` for GPU benchmarks of the full-size architecture or ``sam2.1_hiera_t.yaml`` for a
    SAM 2.1 checkpoint.
    """
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    overrides = [] if image_size == DEFAULT_IMAGE_SIZE else [f"++model.image_size={image_size}"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_video_predictor(resolve_sam2_config(config), ckpt_path=None, device="cpu",
                                           hydra_overrides_extra=list(overrides), apply_postprocessing=True,
                                           vos_optimized=False)
    state = {"model": model.state_dict()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return config, overrides
