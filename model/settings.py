"""Method settings of a live run (the demo, the web demo and the Python API), with the paper's defaults.

This module imports nothing heavy, so that the scripts build their ``--help`` from it before torch loads.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from model.attention import prompts
from model.utils.errors import DecafError

DEFAULT_MLLM = "ckpts/Qwen2.5-VL-7B-Instruct"
DEFAULT_SAM2_CHECKPOINT = "ckpts/sam2-hiera-large/sam2_hiera_large.pt"
DEFAULT_SAM2_CONFIG = "sam2_hiera_l.yaml"


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SegmentSettings:
    """Method settings of a live run; the defaults are the demo's (SPEC §1.5, §13.2, §13.3)."""

    num_input_frames: int = 16  # N (§2.3)
    attn_layer_idx_start: int | str = "auto"  # "auto" = ⌊N_layers/2⌋ (§5.1)
    attn_layer_idx_end: int = -1  # exclusive; ≤ 0 means the last layer
    attn_max_token: int = 400  # Qwen families (§3.1)
    attn_resize_scale: int = 2  # Qwen families (§3.1)
    attn_max_token_per_image: int = -1  # Qwen families
    max_patches: int = 12  # InternVL (§3.3)
    attn_max_batch: int | str = 8  # frame-level conversations per forward (memory only); "auto" halves on OOM
    prompt_obj_ver: int = 0  # prompt versions (§4.3)
    prompt_bg_ver: int = 0
    prompt_obj_cnt_ver: int = 0
    max_new_tokens: int = 128  # §4.7; lower only for smoke tests of random-weight models
    point_threshold: float = 0.8  # τ_pq, inclusive (§8.3)
    final_score_threshold: float = 0.8  # τ_trk, strict (§8.7)
    sam2_batch: int = 1  # SAM2 objects per batch; 1 = per-object, the bit-exact default (§8.10)

    def __post_init__(self) -> None:
        if self.num_input_frames < 1:
            raise DecafError(f"num_input_frames must be positive, got {self.num_input_frames}")
        if self.attn_max_batch != "auto" and (not isinstance(self.attn_max_batch, int) or self.attn_max_batch < 1):
            raise DecafError(f"attn_max_batch must be a positive integer or 'auto', got {self.attn_max_batch!r}")
        if self.attn_layer_idx_start != "auto" and not isinstance(self.attn_layer_idx_start, int):
            raise DecafError(f"attn_layer_idx_start must be an integer or 'auto', got {self.attn_layer_idx_start!r}")
        if not isinstance(self.sam2_batch, int) or self.sam2_batch < 1:
            raise DecafError(f"sam2_batch must be a positive integer, got {self.sam2_batch!r}")
        if self.max_new_tokens < 1:
            raise DecafError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        for name in ("prompt_obj_ver", "prompt_bg_ver", "prompt_obj_cnt_ver"):
            prompts.check_version(name, getattr(self, name))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
