"""Mask PNG folders (SPEC §12.3): the format every stage writes and every evaluator reads."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from model.utils.atomic import atomic_directory
from model.utils.errors import DecafError


def write_mask_folder(folder: str | Path, names: Sequence[str], masks: np.ndarray) -> Path:
    """One 8-bit single-channel ``<name>.png`` per mask, values {0, 255}, no palette, written atomically (§12.3)."""
    if len(names) != len(masks):
        raise ValueError(f"{len(masks)} masks for {len(names)} frame names")
    with atomic_directory(folder) as tmp:
        for name, mask in zip(names, masks):
            # encoded in memory (the bytes cv2.imwrite writes) and written by Python, so a full disk raises an
            # OSError with its reason
            ok, png = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
            if not ok:
                raise DecafError(f"cannot encode {Path(folder) / name}.png")
            (tmp / f"{name}.png").write_bytes(png.tobytes())
    return Path(folder)
