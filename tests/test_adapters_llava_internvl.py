"""LLaVA-OneVision and InternVL3 adapters on tiny checkpoints of the stock classes (SPEC §3.2, §3.3, §5.3, §6.1).

Layouts are checked against the stock model and processor (same features, minus exactly what the reference drops),
grids against the worked examples of SPEC §3, rollouts against the oracle on q/k captured from real forwards.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, copy_frames
from model.adapters.base import AdapterOptions, VisualBatch
from model.adapters.internvl import InternVLAdapter, frame_tiling
from model.adapters.internvl import SYS_INTERNVL
from model.adapters.llava_onevision import LlavaOnevisionAdapter, anyres_layout
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.cache import load_cache
from model.selftest.tiny.internvl import build_tiny_internvl_checkpoint
from model.selftest.tiny.llava_onevision import IMAGE_GRID_PINPOINTS, build_tiny_llava_onevision_checkpoint
from model.utils.errors import DecafError
from test_stage1_qwen import assert_t1, make_davis, naive_rollout

#: LLaVA-OV test frames (W, H): 1×2 anyres tiles whose 27×54 features unpad to 21×54 = 1134 tokens, so LLM passes
#: stay short on CPU (bedroom's own 960×540 gives 3,726 tokens per frame)
LLAVA_FRAME_WH = (400, 150)
ADAPTERS = {"llava_onevision": LlavaOnevisionAdapter, "internvl": InternVLAdapter}


def resized_copies(frames: list[Path], dest: Path, size_wh: tuple[int, int]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in frames:
        target = dest / path.name
        Image.open(path).convert("RGB").resize(size_wh, Image.Resampling.BICUBIC).save(target, quality=95)
        out.append(target)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {"llava_onevision": build_tiny_llava_onevision_checkpoint(root / "tiny-llava-ov"),
            "internvl": build_tiny_internvl_checkpoint(root / "tiny-internvl3")}


@pytest.fixture(scope="module")
def adapters(ckpts) -> dict[str, object]:
    return {family: ADAPTERS[family](ckpts[family], device="cpu", precision="fp32", attn_implementation="sdpa")
            for family in ADAPTERS}


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> dict[str, list[Path]]:
    """Three bedroom frames per family: 960×540 for InternVL, LLAVA_FRAME_WH for LLaVA-OV."""
    root = tmp_path_factory.mktemp("frames")
    native = copy_frames(root / "native", 3, step=8)
    return {"internvl": native, "llava_onevision": resized_copies(native, root / "small", LLAVA_FRAME_WH)}


def one_frame(tmp_path: Path, size_wh: tuple[int, int]) -> list[Path]:
    return resized_copies(copy_frames(tmp_path / "src", 1), tmp_path / f"{size_wh[0]}x{size_wh[1]}", size_wh)


def make_pipeline(adapter, **overrides) -> PromptingPipeline:
    settings = dict(layer_start=2, layer_end=4, attn_max_batch=2, max_new_tokens=2)
    settings.update(overrides)
    return PromptingPipeline(adapter, PipelineSettings(**settings))


def capture(adapter, batch: VisualBatch, impl: str) -> list[torch.Tensor]:
    pipeline = make_pipeline(adapter, rollout_impl=impl)
    try:
        maps, _ = pipeline.capture_pass(batch, decode=False)
    finally:
        pipeline.capture.detach()
    return maps


# ----- LLaVA-OneVision (SPEC §3.2) --------------------------------------------------------------------------
@pytest.mark.parametrize("size_wh, tiles, padded, grid", [
    ((854, 480), (2, 3), (54, 81), (46, 81)),  # best 1152×768: 3×2 tiles (cols×rows), 3,726 tokens
    ((640, 360), (1, 2), (27, 54), (27, 48)),  # 768×384, 1,296 tokens
    ((1280, 720), (2, 4), (54, 108), (54, 96)),  # 1536×768, 5,184 tokens
    ((1920, 1080), (3, 5), (81, 135), (60, 108)),  # 1920×1152, unpadded 75×135, ratio 1.24 → 6,480 tokens
])
def test_llava_anyres_worked_examples(adapters, size_wh, tiles, padded, grid):
    layout = adapters["llava_onevision"].frame_layout((size_wh[1], size_wh[0]))
    assert (layout.tiles, layout.padded, layout.grid) == (tiles, padded, grid)
    assert anyres_layout((size_wh[1], size_wh[0]), IMAGE_GRID_PINPOINTS, 384, 27, 9) == layout


def test_llava_checkpoint_layout_and_prompt(adapters):
    from transformers import LlavaOnevisionForConditionalGeneration

    adapter = adapters["llava_onevision"]
    assert type(adapter.model) is LlavaOnevisionForConditionalGeneration and adapter.family == "llava_onevision"
    assert (adapter.tile, adapter.feature_side, adapter.pooled_side, adapter.max_tiles) == (384, 27, 14, 9)
    assert adapter.pinpoints == IMAGE_GRID_PINPOINTS and len(adapter.pinpoints) == 36
    # SPEC §4.5: SYS_QWEN2 passed explicitly, the checkpoint's template (no newline after <|im_end|>)
    assert adapter.render("P", "video") == ("<|im_start|>system \nYou are a helpful assistant.<|im_end|>"
                                            "<|im_start|>user <video>\nP<|im_end|><|im_start|>assistant\n")


def test_llava_video_has_no_newline_token_or_embedding(adapters, frames):
    """T·196 contiguous <video> tokens whose embeddings are the stock pooled features without the stock newline."""
    adapter = adapters["llava_onevision"]
    paths = frames["llava_onevision"]
    batch = adapter.video_batch(paths, "the bed.")
    visual = batch.visual_mask[0]
    positions = visual.nonzero().flatten()
    assert batch.grid == (3, 14, 14) and len(positions) == 3 * 196
    assert positions[-1] - positions[0] + 1 == len(positions)  # contiguous, frame-major
    ids = batch.extra["input_ids"][0]
    assert int((ids == adapter.video_token_id).sum()) == 3 * 196 and "input_ids" not in batch.inputs

    images = [Image.open(path).convert("RGB") for path in paths]
    stock_ids = adapter.processor(text=[adapter.render("the bed.", "video")], videos=[images],
                                  return_tensors="pt")["input_ids"]
    assert int((stock_ids == adapter.video_token_id).sum()) == 3 * 196 + 1  # the stock layout's newline token
    pixels = adapter.processor.video_processor(videos=[images], return_tensors="pt")["pixel_values_videos"]
    with torch.inference_mode():
        stock = adapter.model.model.get_video_features(pixels).pooler_output[0]
    newline = adapter.model.model.image_newline
    if stock.shape[0] == 3 * 196 + 1:  # recent transformers append the newline here, older ones in forward
        assert torch.equal(stock[-1], newline)
        stock = stock[:-1]
    embeds = batch.inputs["inputs_embeds"][0]
    torch.testing.assert_close(embeds[visual], stock, rtol=1e-5, atol=1e-6)
    assert not (embeds == newline).all(dim=-1).any()


def test_llava_frame_has_no_base_image_and_no_newline_column(adapters, tmp_path):
    """854×480: 3×2 tiles, 46×81 = 3,726 tokens = the stock 4,501 minus 729 base and 46 newline features."""
    adapter = adapters["llava_onevision"]
    paths = one_frame(tmp_path, (854, 480))
    batch = adapter.frame_batch(paths, "the bed.", adapter.video_batch(paths, "the bed."))
    visual = batch.visual_mask[0]
    assert batch.grid == (1, 46, 81) and int(visual.sum()) == 3726 and batch.extra["layout"].tiles == (2, 3)

    image = Image.open(paths[0]).convert("RGB")
    stock_inputs = adapter.processor(text=[adapter.render("the bed.", "image")], images=[image], return_tensors="pt")
    assert int((stock_inputs["input_ids"] == adapter.image_token_id).sum()) == 729 + 46 * 82
    with torch.inference_mode():
        stock = adapter.model.model.get_image_features(
            pixel_values=stock_inputs["pixel_values"], image_sizes=stock_inputs["image_sizes"],
            vision_aspect_ratio="anyres_max_9").pooler_output[0]
    # stock layout: 729 base features, then 46 rows of 81 unpadded features + 1 newline each
    unpadded = stock[729:].reshape(46, 82, -1)
    assert torch.equal(unpadded[:, 81], adapter.model.model.image_newline.expand(46, -1))
    # the stock call encodes the base image with the tiles in one batch, ours the tiles alone: the same fp32
    # features up to the order of floating-point sums (seen up to 1.3e-6 on another CPU's BLAS)
    torch.testing.assert_close(batch.inputs["inputs_embeds"][0][visual], unpadded[:, :81].reshape(46 * 81, -1),
                               rtol=1e-5, atol=1e-5)


def test_llava_frames_must_share_frame_zeros_size(adapters, tmp_path):
    adapter = adapters["llava_onevision"]
    video = adapter.video_batch(one_frame(tmp_path / "a", (854, 480)), "x")
    with pytest.raises(DecafError, match="frame 0 is 854x480"):
        adapter.frame_batch(one_frame(tmp_path / "b", (640, 360)), "x", video)


# ----- InternVL3 (SPEC §3.3) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size_wh, tiling, grid", [
    ((854, 480), (1, 2), (16, 32)), ((640, 360), (1, 2), (16, 32)),  # 2×1 tiles (cols×rows), 512 tokens
    ((1280, 720), (2, 4), (32, 64)),  # 2,048 tokens
    ((640, 480), (3, 4), (48, 64)),  # 3,072 tokens
])
def test_internvl_tiling_worked_examples(adapters, size_wh, tiling, grid):
    adapter = adapters["internvl"]
    size_hw = (size_wh[1], size_wh[0])
    assert adapter.frame_tiling(size_hw) == frame_tiling(size_hw, (448, 448), 12) == tiling
    assert (16 * tiling[0], 16 * tiling[1]) == grid


def test_internvl_checkpoint_layout_and_prompt(adapters):
    from transformers import InternVLForConditionalGeneration, InternVLVideoProcessor

    adapter = adapters["internvl"]
    assert type(adapter.model) is InternVLForConditionalGeneration and adapter.family == "internvl"
    assert adapter.tile == (448, 448) and adapter.tile_grid == (16, 16)  # 448/14 · 0.5, from the config
    # the video size is the checkpoint's (448), not the class default
    assert adapter.processor.video_processor.size["height"] == 448 and InternVLVideoProcessor.size["height"] == 384
    assert adapter.render("P", "video") == (f"<|im_start|>system\n{SYS_INTERNVL}<|im_end|>\n<|im_start|>user\n"
                                            "<video>\nP<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("size_wh, tiles", [((854, 480), 2), ((640, 480), 12)])
def test_internvl_frame_tiles_are_the_stock_crops_without_thumbnail(adapters, tmp_path, size_wh, tiles):
    adapter = adapters["internvl"]
    paths = one_frame(tmp_path, size_wh)
    batch = adapter.frame_batch(paths, "x", adapter.video_batch(paths, "x"))
    assert int(batch.visual_mask.sum()) == tiles * 256 and batch.grid == (1, 16 * batch.tiling[0],
                                                                         16 * batch.tiling[1])
    image = Image.open(paths[0]).convert("RGB")
    stock = adapter.processor.image_processor([image], crop_to_patches=True, max_patches=12, return_tensors="pt")
    assert stock["num_patches"].tolist() == [tiles + 1]  # the stock processor appends a thumbnail
    assert torch.equal(batch.inputs["pixel_values"], stock["pixel_values"][:tiles])
    stock_ids = adapter.processor(text=[adapter.render("x", "image")], images=[image], return_tensors="pt")["input_ids"]
    assert int((stock_ids == adapter.image_token_id).sum()) == (tiles + 1) * 256
    ids = batch.inputs["input_ids"][0].tolist()
    start, end = adapter.processor.start_image_token_id, adapter.processor.end_image_token_id
    assert ids.count(start) == ids.count(end) == 1 and ids.index(end) - ids.index(start) == tiles * 256 + 1


def test_internvl_row_map_puts_each_tile_in_its_place(adapters):
    """``t (th tw) (gh gw) -> t (th gh) (tw gw)`` (SPEC §6.1) for 2×4 tiles."""
    adapter = adapters["internvl"]
    empty = torch.zeros(1, 1, dtype=torch.bool)
    batch = VisualBatch(inputs={}, visual_mask=empty, key_mask=empty, grid=(1, 32, 64), tiling=(2, 4))
    values = torch.arange(2048.0)
    mapped = adapter.row_map(values, batch)
    assert mapped.shape == (1, 32, 64)
    for row in range(2):
        for col in range(4):
            tile = values[(row * 4 + col) * 256:(row * 4 + col + 1) * 256].reshape(16, 16)
            assert torch.equal(mapped[0, 16 * row:16 * row + 16, 16 * col:16 * col + 16], tile)
    video = VisualBatch(inputs={}, visual_mask=empty, key_mask=empty, grid=(2, 16, 16))
    assert torch.equal(adapter.row_map(values[:512], video), values[:512].reshape(2, 16, 16))


def test_internvl_max_patches_flag(ckpts, tmp_path):
    adapter = InternVLAdapter(ckpts["internvl"], device="cpu", precision="fp32",
                              options=AdapterOptions(max_patches=1))
    paths = one_frame(tmp_path, (854, 480))
    batch = adapter.frame_batch(paths, "x", adapter.video_batch(paths, "x"))
    assert batch.tiling == (1, 1) and batch.grid == (1, 16, 16) and int(batch.visual_mask.sum()) == 256
    with pytest.raises(DecafError, match="max_patches"):
        InternVLAdapter(ckpts["internvl"], device="cpu", options=AdapterOptions(max_patches=0))


def test_internvl_head_weights_use_the_exact_visual_set(ckpts, frames):
    """Two video frames: the text between them (``</img>\\nFrame2: <img>``) is not visual. The streamed and literal
    rollouts equal a naive computation over the exact set V (SPEC §5.3) and differ from the range [min V, max V]."""
    adapter = InternVLAdapter(ckpts["internvl"], device="cpu", precision="fp32", attn_implementation="sdpa")
    batch = adapter.video_batch(frames["internvl"][:2], "the bed.")
    visual = batch.visual_mask[0]
    positions = visual.nonzero().flatten()
    span = torch.zeros_like(visual)
    span[positions[0]:positions[-1] + 1] = True
    gap = batch.inputs["input_ids"][0][span & ~visual]
    assert len(positions) == 512 and "Frame2" in adapter.tokenizer.decode(gap).replace(" ", "")

    (streamed,), (literal,) = capture(adapter, batch, "streamed"), capture(adapter, batch, "literal")
    adapter.model.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = adapter.model(**batch.inputs, output_attentions=True).attentions[2:4]
    probs = [layer[0].float() for layer in attentions]
    exact = naive_rollout(probs, visual)[visual].reshape(batch.grid)
    ranged = naive_rollout(probs, span)[visual].reshape(batch.grid)
    assert_t1(streamed, exact)
    assert_t1(literal, exact)
    assert (ranged - exact).abs().max() > 1e-3 * exact.abs().max()


# ----- both families: pipeline, rollout, scripts -------------------------------------------------------------
@pytest.mark.parametrize("family, video_map, frame_map, tiling", [
    ("llava_onevision", (3, 14, 14), (3, 21, 54), None),
    ("internvl", (3, 16, 16), (3, 16, 32), (1, 2)),
])
def test_pipeline_runs_end_to_end(adapters, frames, family, video_map, frame_map, tiling):
    pipeline = make_pipeline(adapters[family])
    try:
        result = pipeline.run(frames[family], "the bed")
    finally:
        pipeline.capture.detach()
    assert result.video_grid == video_map and result.frame_grid == frame_map and result.tiling == tiling
    assert {name: tuple(tensor.shape) for name, tensor in result.maps.items()} == {
        "obj_video": video_map, "obj_frame": frame_map, "bg_video": video_map, "bg_frame": frame_map}
    assert all(bool(torch.isfinite(tensor).all()) and tensor.min() >= 0 for tensor in result.maps.values())
    assert isinstance(result.texts["obj_cls_video"], str) and len(result.texts["obj_cls_frame"]) == 3
    assert result.texts["obj_name"] is not None and "the bed." in result.prompts["obj"]


@pytest.mark.parametrize("family", list(ADAPTERS))
@pytest.mark.parametrize("level", ["video", "frames"])
def test_streamed_equals_literal_on_captured_qk(adapters, frames, family, level):
    adapter = adapters[family]
    video = adapter.video_batch(frames[family], "the bed.")
    batch = video if level == "video" else adapter.frame_batch(frames[family][:2], "the bed.", video)
    for streamed, literal in zip(capture(adapter, batch, "streamed"), capture(adapter, batch, "literal")):
        assert_t1(streamed, literal)


def test_real_vocabulary_token_ids_and_query_token(tmp_path, frames):
    """With the real Qwen2 vocabulary the adapters find SPEC §3's ids, and the query is "\\n" after assistant."""
    llava = LlavaOnevisionAdapter(build_tiny_llava_onevision_checkpoint(tmp_path / "llava", real_vocab=True,
                                                                        num_layers=1), device="cpu")
    internvl = InternVLAdapter(build_tiny_internvl_checkpoint(tmp_path / "internvl", real_vocab=True, num_layers=1),
                               device="cpu")
    assert (llava.image_token_id, llava.video_token_id, internvl.image_token_id) == (151646, 151647, 151667)
    llava_ids = llava.video_batch(frames["llava_onevision"][:1], "the bed.").extra["input_ids"][0]
    internvl_ids = internvl.video_batch(frames["internvl"][:1], "the bed.").inputs["input_ids"][0]
    for ids in (llava_ids, internvl_ids):
        assert ids[-3:].tolist() == [151644, 77091, 198]  # <|im_start|> assistant \n


def shrink_tree(root: Path, size_wh: tuple[int, int]) -> None:
    for path in root.rglob("*.jpg"):
        Image.open(path).convert("RGB").resize(size_wh, Image.Resampling.BICUBIC).save(path, quality=95)


@pytest.mark.parametrize("family, script, flags, frame_grid, tiling", [
    ("llava_onevision", "inference_attn_map_llavaov.py", [], [3, 21, 54], None),
    ("internvl", "inference_attn_map_internvl.py", ["--max_patches", "6"], [3, 16, 32], [1, 2]),
])
def test_script_end_to_end(tmp_path, ckpts, family, script, flags, frame_grid, tiling):
    data = make_davis(tmp_path / "data", {"bedroom": (4, ["the bed"])})
    if family == "llava_onevision":
        shrink_tree(data, LLAVA_FRAME_WH)
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluation" / script), "--dataset", "davis", "--data_root", str(data),
         "--version", str(ckpts[family]), "--model_name", "tiny", "--num_input_frames", "3", "--precision", "fp32",
         "--attn_max_batch", "2", "--max_new_tokens", "2", "--device", "cpu", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cache = load_cache(tmp_path / "attn_weights/tiny/F3_L2--1/davis_valid/bedroom_0.safetensors")
    assert cache.family == family and cache.meta["frame_grid"] == frame_grid and cache.meta["tiling"] == tiling
    assert cache.meta["video_grid"] == [3, *cache.obj_video.shape[1:]] and cache.key_frame_indices == [0, 1, 3]
    assert cache.meta["settings"]["max_patches"] == (6 if family == "internvl" else 12)


@pytest.mark.parametrize("script, family, other", [
    ("inference_attn_map_llavaov.py", "llava_onevision", "internvl"),
    ("inference_attn_map_internvl.py", "internvl", "llava_onevision"),
])
def test_wrong_family_checkpoint_is_a_one_line_error(tmp_path, ckpts, script, family, other):
    import importlib

    main = importlib.import_module(f"evaluation.{script[:-3]}").main
    data = make_davis(tmp_path / "data", {"bedroom": (2, ["the bed"])})
    message = f"is a '{other}' model; this script handles \\['{family}'\\]; use evaluation/"
    with pytest.raises(DecafError, match=message) as error:
        main(["--dataset", "davis", "--data_root", str(data), "--version", str(ckpts[other]), "--device", "cpu"])
    assert "\n" not in str(error.value)
    with pytest.raises(DecafError, match=f"is a '{other}' model"):
        ADAPTERS[family](ckpts[other], device="cpu")
