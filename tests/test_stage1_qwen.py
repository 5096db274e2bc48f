"""Stage 1 on tiny Qwen2-VL / Qwen2.5-VL checkpoints: capture, rollout, pipeline, cache and script (SPEC §3–§5)."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tqdm import tqdm

from conftest import REPO, copy_frames, frame_path
from model.adapters.base import AdapterOptions
from model.adapters.qwen import QwenVLAdapter, smart_resize
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.cache import load_cache
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
from model.utils.errors import DecafError
from model.utils.run_record import StepCounter

SMALL = AdapterOptions(attn_max_token=16)  # tiny token budget: 3×5 merged tokens per slot on 540×960 frames


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="module")
def qwen25(ckpt_dir) -> Path:
    return build_tiny_qwen_checkpoint(ckpt_dir / "tiny-qwen2.5-vl", "qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen2(ckpt_dir) -> Path:
    return build_tiny_qwen_checkpoint(ckpt_dir / "tiny-qwen2-vl", "qwen2_vl")


@pytest.fixture(scope="module")
def adapter25(qwen25) -> QwenVLAdapter:
    return QwenVLAdapter(qwen25, device="cpu", precision="fp32", attn_implementation="sdpa", options=SMALL)


@pytest.fixture(scope="module")
def frames5(tmp_path_factory) -> list[Path]:
    return copy_frames(tmp_path_factory.mktemp("frames"), 5, step=8)


def make_pipeline(adapter, **overrides) -> PromptingPipeline:
    settings = dict(layer_start=2, layer_end=4, attn_max_batch=2, max_new_tokens=3)
    settings.update(overrides)
    pipeline = PromptingPipeline(adapter, PipelineSettings(**settings))
    return pipeline


@pytest.fixture
def pipeline25(adapter25):
    pipeline = make_pipeline(adapter25)
    yield pipeline
    pipeline.capture.detach()


def assert_t1(x: torch.Tensor, oracle: torch.Tensor) -> None:
    """SPEC §0.5 T1: max |x − x̂| ≤ 1e-5 · max |x̂|."""
    assert x.shape == oracle.shape
    assert (x - oracle).abs().max() <= 1e-5 * oracle.abs().max()


# ----- grids (SPEC §3.1 worked examples) ---------------------------------------------------------------------
@pytest.mark.parametrize("size, video, frame", [
    ((480, 854), (392, 728), (784, 1456)), ((720, 1280), (392, 728), (784, 1456)),
    ((1080, 1920), (392, 728), (784, 1456)), ((360, 640), (364, 644), (728, 1288)),
    ((480, 640), (476, 644), (952, 1288)),
])
def test_smart_resize_worked_examples(size, video, frame):
    assert smart_resize(*size, 28, 3136, 400 * 784) == video
    assert (2 * video[0], 2 * video[1]) == frame


def test_video_and_frame_grids_854x480(tmp_path, adapter25):
    """854×480, N = 16, budget 400: video_grid_thw [8, 28, 52] → (8, 14, 26), frames [1, 56, 104] → (28, 52)."""
    frames = []
    for i in range(16):
        path = tmp_path / f"{i:05d}.jpg"
        Image.open(frame_path(i * 2)).resize((854, 480)).save(path)
        frames.append(path)
    adapter = QwenVLAdapter(adapter25.checkpoint, device="cpu", precision="fp32", options=AdapterOptions())
    video = adapter.video_batch(frames, "what?")
    assert video.inputs["video_grid_thw"].tolist() == [[8, 28, 52]]
    assert video.grid == (8, 14, 26) and int(video.visual_mask.sum()) == 2912
    assert video.inputs["second_per_grid_ts"].tolist() == [1.0]
    frame = adapter.frame_batch(frames[:2], "what?", video)
    assert frame.inputs["image_grid_thw"].tolist() == [[1, 56, 104]] * 2
    assert frame.grid == (1, 28, 52) and frame.visual_mask.sum(1).tolist() == [1456, 1456]


def test_odd_frame_count_pads_last_frame(adapter25, frames5):
    video = adapter25.video_batch(frames5, "x")
    assert video.inputs["video_grid_thw"][0, 0].item() == 3  # T' = 6 → 3 slots


def test_real_vocabulary_token_counts_and_query_token(tmp_path):
    """The real Qwen2 vocabulary: the query token is the newline after 'assistant' (SPEC §4.6)."""
    ckpt = build_tiny_qwen_checkpoint(tmp_path / "real", "qwen2_5_vl", real_vocab=True, num_layers=2)
    adapter = QwenVLAdapter(ckpt, device="cpu", precision="fp32", options=AdapterOptions())
    assert (adapter.video_token_id, adapter.image_token_id) == (151656, 151655)
    frames = [tmp_path / f"{i}.jpg" for i in range(2)]
    for i, path in enumerate(frames):
        Image.open(frame_path(i)).resize((854, 480)).save(path)
    video = adapter.video_batch(frames, "the man. \nWhat is it?")
    ids = video.inputs["input_ids"][0]
    assert ids[-1].item() == 198 and adapter.tokenizer.decode(ids[-3:]) == "<|im_start|>assistant\n"
    assert int(video.visual_mask.sum()) == 1 * 14 * 26
    # the visual tokens are contiguous and enclosed by <|vision_start|> … <|vision_end|>
    positions = video.visual_mask[0].nonzero().flatten()
    assert positions[-1] - positions[0] + 1 == len(positions)
    assert ids[positions[0] - 1].item() == 151652 and ids[positions[-1] + 1].item() == 151653


# ----- capture and rollout -----------------------------------------------------------------------------------
def naive_rollout(attentions: list[torch.Tensor], visual: torch.Tensor) -> torch.Tensor:
    """SPEC §5.3–§5.4 written out from per-layer probabilities (H, L, L) of one row."""
    length = attentions[0].shape[-1]
    product = None
    for probs in attentions:
        m = probs[:, :, visual].max(dim=-1).values  # (H, L)
        w = m.mean(dim=1)
        w_hat = w / w.max()
        mean = (w_hat[:, None, None] * probs).sum(0) / probs.shape[0]
        layer = 0.5 * mean + 0.5 * torch.eye(length)
        product = layer if product is None else layer @ product
    return product[-1]


@pytest.mark.parametrize("pass_kind", ["video", "frames"])
def test_streamed_equals_literal_on_captured_qk(adapter25, frames5, pass_kind):
    results = {}
    for impl in ("literal", "streamed"):
        pipeline = make_pipeline(adapter25, rollout_impl=impl)
        try:
            video = adapter25.video_batch(frames5, "the bed.")
            batch = video if pass_kind == "video" else adapter25.frame_batch(frames5[:3], "the bed.", video)
            results[impl], _ = pipeline.capture_pass(batch, decode=False)
        finally:
            pipeline.capture.detach()
    for streamed, literal in zip(results["streamed"], results["literal"]):
        assert_t1(streamed, literal)


def test_literal_matches_models_own_eager_attentions(qwen25, frames5):
    """The capture itself: q/k from the sdpa forward give the probabilities eager output_attentions reports."""
    adapter = QwenVLAdapter(qwen25, device="cpu", precision="fp32", attn_implementation="sdpa", options=SMALL)
    pipeline = make_pipeline(adapter, rollout_impl="literal")
    batch = adapter.video_batch(frames5[:2], "the bed.")
    (captured,), _ = pipeline.capture_pass(batch, decode=False)
    pipeline.capture.detach()
    adapter.model.set_attn_implementation("eager")
    with torch.inference_mode():
        out = adapter.model(**batch.inputs, output_attentions=True)
    row = naive_rollout([a[0].float() for a in out.attentions[2:4]], batch.visual_mask[0])
    expected = row[batch.visual_mask[0]].reshape(batch.grid)
    assert_t1(captured, expected)
    assert captured.min() >= 0 and captured.sum() <= 1


def test_capture_ignores_vision_tower_and_restores_config(adapter25, frames5):
    base = adapter25.text_config._attn_implementation
    pipeline = make_pipeline(adapter25)
    assert adapter25.text_config._attn_implementation.startswith("decaf_capture_")
    assert adapter25.model.config.vision_config._attn_implementation == base
    pipeline.capture.detach()
    assert adapter25.text_config._attn_implementation == base


# ----- pipeline invariances ----------------------------------------------------------------------------------
def test_chunk_size_and_decoding_skip_invariance(adapter25, frames5):
    runs = {}
    for key, overrides in {"b1": dict(attn_max_batch=1), "b2": dict(attn_max_batch=2),
                           "bT": dict(attn_max_batch=5, save_bg_captions=True),
                           "auto": dict(attn_max_batch="auto")}.items():
        pipeline = make_pipeline(adapter25, **overrides)
        try:
            runs[key] = pipeline.run(frames5, "the bed")
        finally:
            pipeline.capture.detach()
    reference = runs["b1"]
    for key, run in runs.items():
        assert run.texts["obj_cls_frame"] == reference.texts["obj_cls_frame"]
        for name, tensor in run.maps.items():
            assert_t1(tensor, reference.maps[name])
    assert runs["bT"].texts["bg_caption_video"] is not None and len(runs["bT"].texts["bg_caption_frame"]) == 5
    assert reference.texts["bg_caption_video"] is None
    assert reference.maps["obj_frame"].shape == (5, 6, 10) and reference.maps["obj_video"].shape == (3, 3, 5)


@pytest.mark.parametrize("overrides, passes", [
    (dict(), 2 + 2 * 3 + 1),  # calls 1 and 4, calls 2 and 5 in chunks of 2 of 5 frames, call 3
    (dict(no_background=True), 1 + 3), (dict(bg_version=1), 2 + 2 * 3), (dict(attn_max_batch=5), 2 + 2 + 1)])
def test_progress_counts_every_mllm_pass(adapter25, frames5, overrides, passes):
    """The stage-1 run's bar shows the current job's passes; a tqdm bar (the API's) counts the same."""
    pipeline = make_pipeline(adapter25, **overrides)
    bar = tqdm(file=io.StringIO())
    pipeline.bar = StepCounter(bar, "MLLM pass")
    try:
        pipeline.run(frames5, "the bed")
        assert pipeline.bar.n == pipeline.bar.total == pipeline.pass_count(5) == passes
        assert bar.postfix == f"MLLM pass {passes}/{passes}"
        pipeline.bar = tqdm(file=io.StringIO(), total=1)
        pipeline.run(frames5[:4], "the bed")
        assert pipeline.bar.n == pipeline.bar.total == pipeline.pass_count(4)
    finally:
        pipeline.capture.detach()


def test_prompt_versions_and_object_only(adapter25, frames5):
    pipeline = make_pipeline(adapter25, bg_version=1, obj_version=2)
    try:
        run = pipeline.run(frames5[:2], "the bed?")
    finally:
        pipeline.capture.detach()
    assert run.texts["obj_name"] is None and run.prompts["choice"] is None  # BACKGROUND v1 needs no call 3
    assert run.prompts["bg"].startswith("Describe the background scene of the video. ")
    assert run.prompts["obj"].startswith("the bed? \nIdentify the primary object")
    pipeline = make_pipeline(adapter25, no_background=True)
    try:
        run = pipeline.run(frames5[:2], "the bed")
    finally:
        pipeline.capture.detach()
    assert set(run.maps) == {"obj_video", "obj_frame"}


def test_qwen2_vl_family(qwen2, frames5):
    adapter = QwenVLAdapter(qwen2, device="cpu", precision="fp32", options=SMALL)
    assert adapter.family == "qwen2_vl"
    pipeline = make_pipeline(adapter)
    try:
        run = pipeline.run(frames5[:4], "the lamp")
    finally:
        pipeline.capture.detach()
    assert "second_per_grid_ts" not in adapter.video_batch(frames5[:2], "x").inputs
    assert run.maps["obj_video"].shape == (2, 3, 5) and run.maps["bg_frame"].shape == (4, 6, 10)


def test_empty_expression_is_an_error(pipeline25, frames5):
    with pytest.raises(DecafError, match="empty"):
        pipeline25.run(frames5[:2], "   ")


# ----- the script end to end ---------------------------------------------------------------------------------
def make_davis(root: Path, videos: dict[str, tuple[int, list[str]]]) -> Path:
    """A Ref-DAVIS17-layout benchmark (SPEC §10.1) from bedroom frames."""
    meta = {"videos": {}}
    for index, (name, (count, expressions)) in enumerate(videos.items()):
        frames = copy_frames(root / "davis17/valid/JPEGImages" / name, count, start=index * 3, step=7)
        meta["videos"][name] = {"frames": [p.stem for p in frames],
                                "expressions": {str(i): {"exp": e, "obj_id": "1"} for i, e in enumerate(expressions)}}
    meta_path = root / "davis17/meta_expressions/valid/meta_expressions.json"
    meta_path.parent.mkdir(parents=True)
    meta_path.write_text(json.dumps(meta))
    return root


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluation/inference_attn_map_qwenvl.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_script_end_to_end_resume_and_errors(tmp_path, qwen25):
    data = make_davis(tmp_path / "data", {"bedroom": (6, ["the bed", "a lamp on the left"]), "room": (4, ["chair"])})
    common = ["--dataset", "davis", "--data_root", str(data), "--version", str(qwen25), "--model_name", "tiny",
              "--num_input_frames", "4", "--attn_max_token", "16", "--precision", "fp32", "--attn_max_batch", "3",
              "--max_new_tokens", "2", "--device", "cpu"]
    result = run_script(*common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "attn_weights/tiny/F4_L2--1/davis_valid"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["bedroom_0.safetensors", "bedroom_1.safetensors", "room_0.safetensors"]
    cache = load_cache(folder / "bedroom_1.safetensors")
    assert cache.family == "qwen2_5_vl" and cache.key_frame_indices == [0, 1, 3, 5]
    assert cache.frame0_size == (540, 960) and cache.meta["layer_start"] == 2 and cache.meta["layer_end"] == 4
    assert cache.obj_video.shape == (2, 3, 5) and cache.bg_frame.shape == (4, 6, 10)
    assert cache.meta["prompts"]["obj"].startswith("a lamp on the left. \n")
    assert list(folder.glob("manifest_*.json")) and not list(folder.glob(".*tmp*"))

    # resume: nothing to do, files untouched
    stamp = (folder / "room_0.safetensors").stat().st_mtime_ns
    result = run_script(*common, cwd=tmp_path)
    assert result.returncode == 0 and (folder / "room_0.safetensors").stat().st_mtime_ns == stamp
    assert "0 to run" in result.stderr

    # other settings: the existing cache is not silently reused
    result = run_script(*common, "--prompt_obj_ver", "0", "--attn_save_path", str(folder), "--attn_max_token", "20",
                        cwd=tmp_path)
    assert result.returncode != 0 and "other settings" in result.stderr

    # a corrupt cache is reported with its path; --overwrite recomputes it
    (folder / "room_0.safetensors").write_bytes(b"garbage")
    result = run_script(*common, cwd=tmp_path)
    assert result.returncode != 0 and "room_0.safetensors" in result.stderr
    result = run_script(*common, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_cache(folder / "room_0.safetensors").frames_count == 4


def test_script_bad_inputs(tmp_path, qwen25):
    data = make_davis(tmp_path / "data", {"bedroom": (3, ["the bed"])})
    base = ["--dataset", "davis", "--data_root", str(data), "--model_name", "tiny", "--device", "cpu",
            "--num_input_frames", "3", "--attn_max_token", "16", "--max_new_tokens", "2"]
    # missing checkpoint folder → one line, exit 2, before any job
    result = run_script(*base, "--version", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "checkpoint folder not found" in result.stderr
    # incomplete checkpoint (no weights)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((qwen25 / "config.json").read_text())
    result = run_script(*base, "--version", str(broken), cwd=tmp_path)
    assert result.returncode == 2 and "no weight files" in result.stderr
    # wrong family
    (broken / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    result = run_script(*base, "--version", str(broken), cwd=tmp_path)
    assert result.returncode == 2 and "llava_onevision" in result.stderr
    # --family states the family (SPEC §13.2): a checkpoint of another one stops the run before the model loads
    result = run_script(*base, "--version", str(qwen25), "--family", "qwen2_vl", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--family qwen2_vl, but checkpoint" in result.stderr and "qwen2_5_vl" in result.stderr
    # unreadable frame: the job fails with a message naming the file, no cache file is written
    frame = data / "davis17/valid/JPEGImages/bedroom/00001.jpg"
    frame.write_bytes(frame.read_bytes()[:200])
    result = run_script(*base, "--version", str(qwen25), cwd=tmp_path)
    assert result.returncode == 3 and "00001.jpg" in result.stderr
    assert not list((tmp_path / "attn_weights").rglob("*.safetensors"))


def test_rollout_rows_are_bounded(adapter25, frames5):
    pipeline = make_pipeline(adapter25)
    try:
        batch = adapter25.video_batch(frames5[:2], "x")
        rollout_maps, _ = pipeline.capture_pass(batch, decode=False)
    finally:
        pipeline.capture.detach()
    values = rollout_maps[0]
    assert values.min() >= 0 and values.max() <= 1 and math.isfinite(float(values.sum()))
