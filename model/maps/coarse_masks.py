"""Coarse attention masks: Φ upsampled to the frame size and thresholded per frame with Otsu (SPEC §7)."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from model.maps.fusion import bilinear_resize


def quantise(phi_frame: torch.Tensor) -> np.ndarray:
    """uint8(x · 255) with x·255 in fp32, truncated toward zero, not rounded (SPEC §7.2)."""
    return (phi_frame.to(torch.float32) * 255.0).to(torch.uint8).cpu().numpy()


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """255 where the value is greater than the frame's OpenCV Otsu level, else 0 (SPEC §7.3).

    OpenCV must be used: scikit-image's Otsu can differ by one grey level. No morphology or filtering.
    """
    _, mask = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return mask


def coarse_masks(phi: torch.Tensor, frame_size: tuple[int, int]) -> np.ndarray:
    """The (T, H₀, W₀) uint8 coarse masks {0, 255} of the T sampled frames (SPEC §7.1–§7.3).

    Each slice of Φ is upsampled bilinearly (``align_corners=False``, no antialias, fp32) to ``frame_size`` =
    (H₀, W₀), quantised and thresholded on its own. Frames are processed one at a time so that memory stays at
    one full-resolution frame.
    """
    if phi.dim() != 3:
        raise ValueError(f"expected Φ of shape (T, h, w), got {tuple(phi.shape)}")
    height, width = int(frame_size[0]), int(frame_size[1])
    masks = np.empty((phi.shape[0], height, width), dtype=np.uint8)
    with torch.no_grad():
        for t in range(phi.shape[0]):
            upsampled = bilinear_resize(phi[t:t + 1], (height, width))[0]
            masks[t] = otsu_mask(quantise(upsampled))
    return masks
