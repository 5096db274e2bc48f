"""The family-specific input options (SPEC §3, §13.2), declared once with the families that read them.

Light on purpose (no torch): the flag parsers read the defaults, help texts and which family takes which flag from
here before any model code loads (:mod:`model.settings`), and the adapters read the values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: the cache family names (SPEC §12.2) of each group of families that share an input rule
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
INTERNVL_FAMILIES = ("internvl",)


def _option(default: int, families: tuple[str, ...], help: str) -> Any:
    return field(default=default, metadata={"families": families, "help": help})


@dataclass(frozen=True)
class AdapterOptions:
    """Family-specific input flags (SPEC §13.2); each family reads the ones it declares here."""

    attn_max_token: int = _option(400, QWEN_FAMILIES, "Qwen families: merged tokens per video time slot; "
                                  "max_pixels = value·28² (·32² for Qwen3-VL) (SPEC §3.1)")
    attn_resize_scale: int = _option(2, QWEN_FAMILIES, "Qwen families: frame-level images are s× the video frame "
                                     "size per side (SPEC §3.1)")
    attn_max_token_per_image: int = _option(-1, QWEN_FAMILIES, "Qwen families: if > 0, frame-level images keep "
                                            "their aspect ratio with max_pixels = value·28² (·32² for Qwen3-VL) "
                                            "instead of the s× rule")
    max_patches: int = _option(12, INTERNVL_FAMILIES, "InternVL: maximum number of 448-px tiles per frame "
                               "(SPEC §3.3)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def flags_for(cls, families: tuple[str, ...]) -> tuple[str, ...]:
        """The options any of these families reads, in declaration order."""
        return tuple(f.name for f in fields(cls) if set(f.metadata["families"]) & set(families))

    @classmethod
    def describe(cls, name: str) -> tuple[int, str]:
        """(default, help text) of one option."""
        option = next(f for f in fields(cls) if f.name == name)
        return option.default, option.metadata["help"]
