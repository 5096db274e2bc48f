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

#: config ``model_type`` → (module in this package, adapter class, its stage-1 script in ``evaluation/``, the family
#: name recorded in caches). The class declares the same model_type → family map (``model_types``), checked on import.
ADAPTERS: dict[str, tuple[str, str, str, str]] = {
    "qwen2_vl": ("qwen", "QwenVLAdapter", "inference_attn_map_qwenvl.py", "qwen2_vl"),
    "qwen2_5_vl": ("qwen", "QwenVLAdapter", "inference_attn_map_qwenvl.py", "qwen2_5_vl"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLAdapter", "inference_attn_map_qwen3vl.py", "qwen3_vl"),
    "qwen3_vl_moe": ("qwen3_vl", "Qwen3VLAdapter", "inference_attn_map_qwen3vl.py", "qwen3_vl"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionAdapter", "inference_attn_map_llavaov.py",
                        "llava_onevision"),
    "internvl": ("internvl", "InternVLAdapter", "inference_attn_map_internvl.py", "internvl"),
}
#: every family name a cache may record (SPEC §12.2) and ``--family`` accepts (SPEC §13.2)
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(row[3] for row in ADAPTERS.values()))


def families_in(module: str) -> tuple[str, ...]:
    """The cache family names whose adapter lives in ``model/adapters/<module>.py``."""
    return tuple(dict.fromkeys(row[3] for row in ADAPTERS.values() if row[0] == module))


def adapter_in(module: str) -> type[MLLMAdapter]:
    """The adapter class of ``model/adapters/<module>.py`` (imported now)."""
    model_type = next((key for key, row in ADAPTERS.items() if row[0] == module), None)
    if model_type is None:
        raise KeyError(f"no adapter module {module!r}; known: {sorted({row[0] for row in ADAPTERS.values()})}")
    return adapter_for_model_type(model_type)


def extraction_script(model_type: str | None) -> str | None:
    """``evaluation/<script>`` that extracts attention for this ``model_type``, or None if unsupported."""
    return f"evaluation/{ADAPTERS[model_type][2]}" if model_type in ADAPTERS else None


def adapter_for_model_type(model_type: str | None) -> type[MLLMAdapter]:
    """The adapter class handling checkpoints whose ``config.json`` has this ``model_type``."""
    if model_type not in ADAPTERS:
        raise DecafError(f"no DecAF adapter supports model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ADAPTERS))}")
    module_name, class_name, _, family = ADAPTERS[model_type]
    adapter_class = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    if adapter_class.model_types.get(model_type) != family:  # the table and the class must agree
        raise RuntimeError(f"{class_name} does not map model_type {model_type!r} to family {family!r}")
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
