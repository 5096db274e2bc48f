"""MLLM adapters, one module per family (SPEC §3), and the registry that picks one for a checkpoint.

The family is read from the checkpoint's ``config.json`` (``model_type``), never from its folder name (§14 #27).
Adapter modules are imported only when asked for, so choosing a family does not import the others.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from model.utils.errors import DecafError

if TYPE_CHECKING:
    from model.adapters.base import MLLMAdapter

#: config ``model_type`` → (module in this package, adapter class, its stage-1 script in ``evaluation/``)
ADAPTERS: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("qwen", "QwenVLAdapter", "inference_attn_map_qwenvl.py"),
    "qwen2_5_vl": ("qwen", "QwenVLAdapter", "inference_attn_map_qwenvl.py"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLAdapter", "inference_attn_map_qwen3vl.py"),
    "qwen3_vl_moe": ("qwen3_vl", "Qwen3VLAdapter", "inference_attn_map_qwen3vl.py"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionAdapter", "inference_attn_map_llavaov.py"),
    "internvl": ("internvl", "InternVLAdapter", "inference_attn_map_internvl.py"),
}


def extraction_script(model_type: str | None) -> str | None:
    """``evaluation/<script>`` that extracts attention for this ``model_type``, or None if unsupported."""
    return f"evaluation/{ADAPTERS[model_type][2]}" if model_type in ADAPTERS else None


def adapter_for_model_type(model_type: str | None) -> type[MLLMAdapter]:
    """The adapter class handling checkpoints whose ``config.json`` has this ``model_type``."""
    if model_type not in ADAPTERS:
        raise DecafError(f"no DecAF adapter supports model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ADAPTERS))}")
    module_name, class_name, _ = ADAPTERS[model_type]
    adapter_class = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    if model_type not in adapter_class.model_types:  # the table and the class must agree
        raise RuntimeError(f"{class_name} does not declare model_type {model_type!r}")
    return adapter_class


def adapter_for_checkpoint(checkpoint: str | Path) -> type[MLLMAdapter]:
    """The adapter class of a local checkpoint folder, from its ``config.json``; one-line errors for a missing
    folder (naming ``ckpts/README.md``) or an unsupported model."""
    from model.adapters.base import read_checkpoint_config

    model_type = read_checkpoint_config(checkpoint).get("model_type")
    try:
        return adapter_for_model_type(model_type)
    except DecafError as exc:
        raise DecafError(f"checkpoint {checkpoint}: {exc}") from exc
