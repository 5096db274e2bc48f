"""What a run records about its image processor, and the library warnings silenced at their source (issue 14).

* ``--image_processor slow|fast``: under transformers 5 the plain class names are the torchvision processors, so
  the cache names the backend that ran; the default is the paper reference's (SPEC §3.1, §3.2).
* The Qwen2/2.5-VL video processor's ``cap_pixels_per_frame`` deprecation warning and InternVL3-hf's tied-weights
  warning must not appear when the real loading code loads tiny checkpoints of the real classes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors import safe_open

from conftest import copy_frames
from model.adapters.base import AdapterOptions, load_rgb
from model.adapters.internvl import InternVLAdapter
from model.adapters.llava_onevision import LlavaOnevisionAdapter
from model.adapters.qwen import QwenVLAdapter
from model.cache import setting_mismatches
from model.parsers import build_stage1_parser as build_parser
from model.selftest.tiny.internvl import build_tiny_internvl_checkpoint
from model.selftest.tiny.llava_onevision import build_tiny_llava_onevision_checkpoint
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint

SMALL = AdapterOptions(attn_max_token=16)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {"qwen2_5_vl": build_tiny_qwen_checkpoint(root / "qwen25", "qwen2_5_vl", num_layers=2),
            "qwen2_vl": build_tiny_qwen_checkpoint(root / "qwen2", "qwen2_vl", num_layers=2),
            "llava_onevision": build_tiny_llava_onevision_checkpoint(root / "llava", num_layers=2),
            "internvl": build_tiny_internvl_checkpoint(root / "internvl", num_layers=2)}


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[Path]:
    return copy_frames(tmp_path_factory.mktemp("frames"), 2, step=9)


@contextlib.contextmanager
def library_warnings() -> Iterator[list[str]]:
    """Every warning transformers logs or raises in the block. ``warning_once`` forgets what it already showed
    (another test may have shown it), so a message that would appear on a user's run appears here too."""
    logging.Logger.warning_once.cache_clear()
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Collect()
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        library.removeHandler(handler)


ADAPTERS = {"qwen2_5_vl": QwenVLAdapter, "llava_onevision": LlavaOnevisionAdapter, "internvl": InternVLAdapter}
#: (default backend, class of the PIL backend, class of the torchvision backend)
PROCESSORS = {"qwen2_5_vl": ("pil", "Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor"),
              "llava_onevision": ("pil", "LlavaOnevisionImageProcessorPil", "LlavaOnevisionImageProcessor"),
              "internvl": ("torchvision", "GotOcr2ImageProcessorPil", "GotOcr2ImageProcessor")}


# ----- item 2: the image processor that ran is recorded ------------------------------------------------------
@pytest.mark.parametrize("family", list(ADAPTERS))
def test_image_processor_choice_is_loaded_and_recorded(ckpts, frames, family):
    default, pil_class, torchvision_class = PROCESSORS[family]
    pixels = {}
    for choice in (None, "slow", "fast"):
        adapter = ADAPTERS[family](ckpts[family], device="cpu", precision="fp32", image_processor=choice,
                                   options=SMALL)
        backend = {"slow": "pil", "fast": "torchvision", None: default}[choice]
        settings = adapter.settings()
        name = pil_class if backend == "pil" else torchvision_class
        label = "PIL" if backend == "pil" else "torchvision"
        assert settings["image_processor"] == f"{name} ({label} backend)"
        assert type(adapter.processor.image_processor).__name__ == name
        assert settings["image_processor_backend"] == backend
        video = adapter.video_batch(frames, "x")  # the adapter runs on either backend
        adapter.frame_batch(frames, "the bed.", video)
        pixels[backend] = adapter.processor.image_processor([load_rgb(frames[0])], return_tensors="pt")[
            "pixel_values"]
    # the same preprocessing: the backends differ only where they round resized pixels (a few 8-bit levels at
    # single pixels, 1/255/std ≈ 0.017 each after normalisation)
    assert pixels["pil"].shape == pixels["torchvision"].shape
    difference = (pixels["pil"] - pixels["torchvision"]).abs()
    assert difference.max() < 0.1 and difference.mean() < 1e-3


def test_stage1_flag_and_cache_matching():
    args = build_parser("x", ()).parse_args(["--dataset", "davis", "--version", "v", "--image_processor", "fast"])
    assert args.image_processor == "fast"
    assert build_parser("x", ()).parse_args(["--dataset", "davis", "--version", "v"]).image_processor is None
    with pytest.raises(SystemExit):
        build_parser("x", ()).parse_args(["--dataset", "davis", "--version", "v", "--image_processor", "pil"])
    slow, fast = (QwenVLAdapter.matched_settings(choice) for choice in ("slow", "fast"))
    assert QwenVLAdapter.matched_settings(None) == slow == {"image_processor_backend": "pil",
                                                            "mrope_positions": "transformers-4.52"}
    assert InternVLAdapter.matched_settings(None) == {"image_processor_backend": "torchvision"}
    assert setting_mismatches({"settings": slow}, {"settings": fast}) == ["settings.image_processor_backend"]
    # a cache of the bare class-name era records neither the backend nor the rule: other settings
    assert setting_mismatches({"settings": {"image_processor": "Qwen2VLImageProcessor"}}, {"settings": slow}) == [
        "settings.image_processor_backend", "settings.mrope_positions"]


# ----- item 3: warnings silenced at the source ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_video_pass_has_no_cap_pixels_warning(ckpts, frames, family):
    adapter = QwenVLAdapter(ckpts[family], device="cpu", precision="fp32", options=SMALL)
    images = [load_rgb(path) for path in frames]
    with library_warnings() as shown:  # the harness sees the warning where the argument is left out
        adapter.processor.video_processor(videos=[images], return_tensors="pt")
    assert any("cap_pixels_per_frame" in message for message in shown)
    with library_warnings() as shown:
        video = adapter.video_batch(frames, "the bed.")
        adapter.frame_batch(frames, "the bed.", video)
    assert not [message for message in shown if "cap_pixels_per_frame" in message]


def test_internvl_published_tying_loads_untied_without_warning(tmp_path):
    """InternVL3-hf's config.json has no top-level tie_word_embeddings (text_config says false) and its files hold
    a separate lm_head: the library alone warns on every load; the adapter sets the flag and loads the same
    weights without the warning."""
    from transformers import InternVLForConditionalGeneration

    ckpt = build_tiny_internvl_checkpoint(tmp_path / "internvl", num_layers=2, published_tying=True)
    config = json.loads((ckpt / "config.json").read_text())
    assert "tie_word_embeddings" not in config and config["text_config"]["tie_word_embeddings"] is False
    with safe_open(str(ckpt / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
        head = handle.get_tensor(next(n for n in names if n.endswith("lm_head.weight")))
        embedding = handle.get_tensor(next(n for n in names if n.endswith("embed_tokens.weight")))
    assert not torch.equal(head, embedding)

    with library_warnings() as shown:
        InternVLForConditionalGeneration.from_pretrained(str(ckpt))
    assert any("tie_word_embeddings=False" in message for message in shown)
    with library_warnings() as shown:
        adapter = InternVLAdapter(ckpt, device="cpu", precision="fp32")
    assert not [message for message in shown if "tie" in message]
    model = adapter.model
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.get_input_embeddings().weight, embedding)
