"""True-fp32 regions (SPEC §0.6, §5.5, §6.2).

Captured attention, rollout, smoothing and fusion must run in fp32 with TF32 disabled. Other libraries may
flip PyTorch's global flags, so the method code sets them explicitly around its own work and restores them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Disable TF32 for matmuls and cuDNN convolutions inside the block; restore the flags afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
