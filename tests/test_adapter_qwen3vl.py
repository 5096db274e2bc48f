"""Qwen3-VL (extension, SPEC §3.4) on a tiny random-weight checkpoint: grids, time stamps, capture, script."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, copy_frames, frame_path
from model.adapters.base import AdapterOptions, resolve_layer_range
from model.adapters.qwen import smart_resize
from model.adapters.qwen3_vl import CLIP_FPS, Qwen3VLAdapter, slot_timestamps
from model.attention.capture import Tee
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.attention.rollout import make_rollout
from model.cache import load_cache
from model.maps.fusion import fuse_cache
from model.selftest.tiny.qwen3_vl import build_tiny_qwen3_vl_checkpoint, reference_config
from model.utils.errors import DecafError
from test_stage1_qwen import make_davis

SMALL = AdapterOptions(attn_max_token=16)  # 540×960 frames → 96×160 px → 3×5 merged tokens per slot


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_qwen3_vl_checkpoint(tmp_path_factory.mktemp("ckpts") / "tiny-qwen3-vl")


@pytest.fixture(scope="module")
def adapter(ckpt) -> Qwen3VLAdapter:
    return Qwen3VLAdapter(ckpt, device="cpu", precision="fp32", attn_implementation="sdpa", options=SMALL)


@pytest.fixture(scope="module")
def frames5(tmp_path_factory) -> list[Path]:
    return copy_frames(tmp_path_factory.mktemp("frames"), 5, step=8)


def make_pipeline(adapter, **overrides) -> PromptingPipeline:
    settings = dict(layer_start=2, layer_end=4, attn_max_batch=2, max_new_tokens=2)
    settings.update(overrides)
    return PromptingPipeline(adapter, PipelineSettings(**settings))


def assert_t1(x: torch.Tensor, oracle: torch.Tensor) -> None:
    """SPEC §0.5 T1: max |x − x̂| ≤ 1e-5 · max |x̂|."""
    assert x.shape == oracle.shape
    assert (x - oracle).abs().max() <= 1e-5 * oracle.abs().max()


# ----- the checkpoint ----------------------------------------------------------------------------------------
def test_tiny_checkpoint_reloads_with_the_real_layout(ckpt, adapter):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration

    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    vision = config["vision_config"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (16, 2, 2)
    assert all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"])
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    assert type(model) is Qwen3VLForConditionalGeneration is type(adapter.model)
    reloaded, loaded = model.state_dict(), adapter.model.state_dict()
    assert reloaded.keys() == loaded.keys() and all(torch.equal(reloaded[k], loaded[k]) for k in loaded)
    processor = AutoProcessor.from_pretrained(ckpt)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    # layout and factor come from the processor (SPEC §3.4): 16-px patches × 2×2 merge = 32 px per token
    assert (adapter.patch, adapter.merge, adapter.temporal_patch, adapter.factor) == (16, 2, 2, 32)
    # no system turn (SPEC §4.4): the rendering starts with the user turn, visual item first (§4.5)
    assert adapter.render("the bed", "video") == ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
                                                  "the bed<|im_end|>\n<|im_start|>assistant\n")
    # default start layer ⌊N_layers/2⌋ (§3.4, §5.1)
    assert resolve_layer_range(adapter.num_layers, "auto", -1) == (2, 4)


def test_reference_config_is_qwen3_vl_8b():
    config = reference_config()
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (36, 4096, 32, 8, 128, 12288, 151936)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.patch_size, vision.spatial_merge_size,
            vision.temporal_patch_size, list(vision.deepstack_visual_indexes)) == (27, 1152, 4096, 16, 2, 2,
                                                                                  [8, 16, 24])
    assert (config.video_token_id, config.image_token_id) == (151656, 151655)
    assert resolve_layer_range(text.num_hidden_layers, "auto", -1) == (18, 36)


def test_moe_checkpoint_loads_the_same_way(tmp_path, frames5):
    ckpt = build_tiny_qwen3_vl_checkpoint(tmp_path / "tiny-moe", moe=True, num_layers=2)
    adapter = Qwen3VLAdapter(ckpt, device="cpu", precision="fp32", attn_implementation="sdpa", options=SMALL)
    assert type(adapter.model).__name__ == "Qwen3VLMoeForConditionalGeneration" and adapter.family == "qwen3_vl"
    pipeline = make_pipeline(adapter, layer_start=1, layer_end=2)
    try:
        (video_map,), (answer,) = pipeline.capture_pass(adapter.video_batch(frames5[:4], "the bed"), decode=True)
    finally:
        pipeline.capture.detach()
    assert video_map.shape == (2, 3, 5) and video_map.min() >= 0 and isinstance(answer, str)


def test_inconsistent_processor_layout_is_refused(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    processor_config = json.loads((broken / "processor_config.json").read_text())
    processor_config["video_processor"]["patch_size"] = 14
    (broken / "processor_config.json").write_text(json.dumps(processor_config))
    with pytest.raises(DecafError, match="differ between"):
        Qwen3VLAdapter(broken, device="cpu", precision="fp32", options=SMALL)


# ----- grids (SPEC §3.4) -------------------------------------------------------------------------------------
def test_worked_example_854x480(tmp_path, ckpt):
    """854×480, N = 16, attn_max_token 400, factor 32 (SPEC §3.1 rule with §3.4's factor).

    round(480/32)·32 = 480 and round(854/32)·32 = 864; 480·864 = 414,720 > 409,600 = 400·32², so
    β = sqrt(480·854 / 409,600) ≈ 1.00039, h̄ = floor(479.81/32)·32 = 448 and w̄ = floor(853.67/32)·32 = 832.
    Video: video_grid_thw [8, 28, 52] → map (8, 14, 26), 2,912 video tokens in 8 blocks of 364.
    Frames (s = 2): 896×1664 px, image_grid_thw [1, 56, 104] → map (28, 52), 1,456 tokens per frame.
    """
    assert smart_resize(480, 854, 32, 4 * 32 ** 2, 400 * 32 ** 2) == (448, 832)
    frames = []
    for i in range(16):
        path = tmp_path / f"{i:05d}.jpg"
        Image.open(frame_path(i * 2)).resize((854, 480)).save(path)
        frames.append(path)
    adapter = Qwen3VLAdapter(ckpt, device="cpu", precision="fp32", options=AdapterOptions())
    video = adapter.video_batch(frames, "what?")
    assert video.inputs["video_grid_thw"].tolist() == [[8, 28, 52]]
    assert video.grid == (8, 14, 26) and int(video.visual_mask.sum()) == 2912
    assert video.extra["timestamps"] == [f"{i}.2" for i in range(8)]
    frame = adapter.frame_batch(frames[:2], "what?", video)
    assert frame.inputs["image_grid_thw"].tolist() == [[1, 56, 104]] * 2
    assert frame.grid == (1, 28, 52) and frame.visual_mask.sum(1).tolist() == [1456, 1456]
    # per-image budget: natural aspect ratio, max_pixels = k·32²; k = 100: β ≈ 2.0008, floor(7.50)·32 = 224 and
    # floor(13.34)·32 = 416 → image_grid_thw [1, 14, 26] → map (7, 13)
    per_image = Qwen3VLAdapter(ckpt, device="cpu", precision="fp32",
                               options=AdapterOptions(attn_max_token_per_image=100))
    frame = per_image.frame_batch(frames[:1], "what?", video)
    assert frame.inputs["image_grid_thw"].tolist() == [[1, 14, 26]] and frame.grid == (1, 7, 13)


def test_video_tokens_are_not_contiguous(adapter, frames5):
    """Odd T = 5 → T' = 6 → t_v = 3 = ⌈T/2⌉ slots, each its own block after a time stamp (SPEC §3.4)."""
    video = adapter.video_batch(frames5, "the bed")
    t, h, w = video.grid
    assert (t, h, w) == (3, 3, 5) and t == math.ceil(len(frames5) / 2)
    positions = video.visual_mask[0].nonzero().flatten()
    assert len(positions) == t * h * w
    assert int(positions[-1] - positions[0]) + 1 > len(positions)  # gaps: V is not a range
    runs = torch.tensor_split(positions, torch.nonzero(positions.diff() > 1).flatten() + 1)
    assert [len(run) for run in runs] == [h * w] * t  # one contiguous block per temporal slot
    ids = video.inputs["input_ids"][0]
    tokenizer = adapter.tokenizer
    for slot, run in enumerate(runs):
        before = tokenizer.decode(ids[:run[0]], skip_special_tokens=False)
        assert before.endswith(f"<{slot}.2 seconds><|vision_start|>")
        assert tokenizer.decode(ids[run[-1] + 1:run[-1] + 2], skip_special_tokens=False) == "<|vision_end|>"
    assert video.extra["timestamps"] == slot_timestamps(6, CLIP_FPS, 2) == ["0.2", "1.2", "2.2"]
    # the query is the last prompt token, the newline after "assistant" (§4.6)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids[-1:]) == "\n"
    # the map has t·h·w values, filled from V in sequence order (§6.1)
    values = torch.arange(t * h * w, dtype=torch.float32)
    assert torch.equal(adapter.row_map(values, video).flatten(), values)


# ----- capture and rollout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pass_kind", ["video", "frames"])
def test_streamed_equals_literal_on_captured_qk(adapter, frames5, pass_kind):
    """Streamed rollout (§5.8a) vs the paper-literal oracle on the same captured q/k (T1)."""
    video = adapter.video_batch(frames5, "the bed.")
    batch = video if pass_kind == "video" else adapter.frame_batch(frames5[:2], "the bed.", video)
    pipeline = make_pipeline(adapter)
    streamed = make_rollout("streamed", batch.visual_mask, batch.key_mask)
    literal = make_rollout("literal", batch.visual_mask, batch.key_mask)
    try:
        with torch.inference_mode(), pipeline.capture.armed(Tee(streamed, literal), batch.seq_len):
            adapter.model(**batch.inputs, use_cache=False)
    finally:
        pipeline.capture.detach()
    rows_streamed, rows_literal = streamed.rows(), literal.rows()
    for b in range(rows_literal.shape[0]):
        visual = batch.visual_mask[b]
        assert_t1(rows_streamed[b][visual], rows_literal[b][visual])
        assert rows_literal[b][visual].min() >= 0 and rows_literal[b].sum() <= 1 + 1e-6


def test_captured_qk_match_eager_attentions(ckpt, frames5):
    """The capture hands over post-q/k-norm, post-RoPE q and k: the literal rollout equals one built from the
    probabilities that the eager kernel reports (SPEC §5.2)."""
    adapter = Qwen3VLAdapter(ckpt, device="cpu", precision="fp32", attn_implementation="sdpa", options=SMALL)
    pipeline = make_pipeline(adapter, rollout_impl="literal")
    batch = adapter.video_batch(frames5[:3], "the bed.")
    try:
        (captured,), _ = pipeline.capture_pass(batch, decode=False)
    finally:
        pipeline.capture.detach()
    adapter.model.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = adapter.model(**batch.inputs, output_attentions=True).attentions
    visual = batch.visual_mask[0]
    length = visual.shape[0]
    product = None
    for probs in (a[0].float() for a in attentions[2:4]):  # SPEC §5.3–§5.4 written out
        w = probs[:, :, visual].max(dim=-1).values.mean(dim=1)
        layer = 0.5 * ((w / w.max())[:, None, None] * probs).sum(0) / probs.shape[0] + 0.5 * torch.eye(length)
        product = layer if product is None else layer @ product
    assert_t1(captured, product[-1][visual].reshape(batch.grid))


# ----- pipeline and script -----------------------------------------------------------------------------------
def test_pipeline_end_to_end_on_bedroom(adapter, frames5):
    pipeline = make_pipeline(adapter, attn_max_batch=3)
    try:
        run = pipeline.run(frames5, "the bed on the left")
    finally:
        pipeline.capture.detach()
    assert run.video_grid == (3, 3, 5) and run.frame_grid == (5, 6, 10)  # frames: s·(h_v, w_v) (§3.4)
    assert set(run.maps) == {"obj_video", "obj_frame", "bg_video", "bg_frame"}
    for tensor in run.maps.values():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
        assert tensor.min() >= 0 and tensor.max() <= 1
    assert len(run.texts["obj_cls_frame"]) == 5 and isinstance(run.texts["obj_name"], str)
    assert run.prompts["bg"].startswith("Describe the background scene of the video, excluding any ")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluation/inference_attn_map_qwen3vl.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_script_on_davis_layout(tmp_path, ckpt):
    data = make_davis(tmp_path / "data", {"bedroom": (5, ["the bed"])})
    result = run_script("--dataset", "davis", "--data_root", str(data), "--version", str(ckpt), "--model_name", "tiny3",
                        "--num_input_frames", "3", "--attn_max_token", "16", "--precision", "fp32",
                        "--attn_max_batch", "2", "--max_new_tokens", "2", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "attn_weights/tiny3/F3_L2--1/davis_valid/bedroom_0.safetensors"  # auto start = 4 // 2
    cache = load_cache(path)
    assert cache.family == "qwen3_vl" and cache.key_frame_indices == [0, 2, 4]
    assert cache.obj_video.shape == (2, 3, 5) and cache.bg_frame.shape == (3, 6, 10)  # t_v = ⌈3/2⌉
    settings = cache.meta["settings"]
    assert settings["video_fps"] == CLIP_FPS and settings["attn_max_token"] == 16
    phi = fuse_cache(cache)  # §6.5: slots repeated ×2, the padded frame's slice dropped
    assert phi.shape == (3, 6, 10) and phi.max() == 1
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0 and "--attn_max_token_per_image" in result.stdout
