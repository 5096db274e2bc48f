"""M-RoPE positions of Qwen2-VL / Qwen2.5-VL video passes follow the paper's library, transformers 4.52 (SPEC §3.1).

The rule is re-implemented here from SPEC's formula alone — text after a video block starts at
start + max((t−1)·interval, h−1, w−1) + 1, tokens inside the block at (start + ⌊i·interval⌋, start + j,
start + k) — and compared with the position ids the adapter feeds the prefill, with the positions the model actually receives
while generating, and, through the literal rollout oracle, with the maps of a video pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import copy_frames
from model.adapters.base import AdapterOptions
from model.adapters.qwen import PAPER_MROPE, QwenVLAdapter
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.attention.rollout import make_rollout
from model.cache import load_cache, save_cache
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint

SIZES = [(854, 480), (640, 360), (400, 300), (320, 240), (176, 144)]  # W×H
FRAMES = 16
#: merged (h, w) per slot of each size at attn_max_token 400 (smart_resize, SPEC §3.1)
MERGED = {(854, 480): (14, 26), (640, 360): (13, 23), (400, 300): (11, 14), (320, 240): (9, 11), (176, 144): (5, 6)}
INTERVAL = {"qwen2_5_vl": 2.0, "qwen2_vl": 1.0}  # tokens_per_second × second_per_grid_ts; Qwen2-VL: 1


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, QwenVLAdapter]:
    root = tmp_path_factory.mktemp("ckpts")
    return {family: QwenVLAdapter(build_tiny_qwen_checkpoint(root / family, family), device="cpu", precision="fp32",
                                  attn_implementation="sdpa", options=AdapterOptions())
            for family in INTERVAL}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[tuple[int, int], list[Path]]:
    """16 bedroom frames resized to each size (resized copies of conftest.copy_frames)."""
    root = tmp_path_factory.mktemp("videos")
    source = copy_frames(root / "source", FRAMES, step=2)
    out = {}
    for width, height in SIZES:
        folder = root / f"{width}x{height}"
        folder.mkdir()
        out[(width, height)] = []
        for path in source:
            target = folder / path.name
            Image.open(path).resize((width, height)).save(target)
            out[(width, height)].append(target)
    return out


def rule_4_52(ids: list[int], visual_id: int, grid: tuple[int, int, int], interval: float) -> torch.Tensor:
    """(3, L) positions of a sequence with one visual block of merged ``grid``, from SPEC §3.1's formula."""
    t, h, w = grid
    rows: list[list[int]] = [[], [], []]
    position, i = 0, 0
    while i < len(ids):
        if ids[i] != visual_id:
            for row in rows:
                row.append(position)
            position += 1
            i += 1
            continue
        start = position
        for slot in range(t):
            for y in range(h):
                for x in range(w):
                    rows[0].append(start + int(slot * interval))
                    rows[1].append(start + y)
                    rows[2].append(start + x)
        position = start + max(int((t - 1) * interval), h - 1, w - 1) + 1
        i += t * h * w
    return torch.tensor(rows)


def library_positions(adapter: QwenVLAdapter, inputs: dict) -> torch.Tensor:
    """The installed transformers' own positions of the same inputs (the rule the adapter replaces)."""
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = adapter.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      attention_mask=inputs["attention_mask"], **kwargs)
    return positions


class PositionRecorder:
    """Records the position ids the language model receives in every forward call (prefill, then each step)."""

    def __init__(self, adapter: QwenVLAdapter):
        self.seen: list[torch.Tensor] = []
        self.handle = adapter.model.model.language_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.seen.append(kwargs["position_ids"].clone())

    def __enter__(self) -> PositionRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()


def assert_t1(x: torch.Tensor, oracle: torch.Tensor) -> None:
    """SPEC §0.5 T1: max |x − x̂| ≤ 1e-5 · max |x̂|."""
    assert x.shape == oracle.shape
    assert (x - oracle).abs().max() <= 1e-5 * oracle.abs().max()


@pytest.mark.parametrize("family", list(INTERVAL))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_video_pass_positions_follow_the_4_52_rule(adapters, videos, family, size):
    """Prefill (text after the video included) and generated tokens sit where transformers 4.52 put them."""
    adapter = adapters[family]
    batch = adapter.video_batch(videos[size], "the bed on the left.")
    t, h, w = batch.grid
    assert (t, (h, w)) == (FRAMES // 2, MERGED[size])
    ids = batch.inputs["input_ids"][0].tolist()
    expected = rule_4_52(ids, adapter.video_token_id, batch.grid, INTERVAL[family])
    assert torch.equal(batch.inputs["position_ids"][:, 0], expected)
    # the library's own rule differs exactly where SPEC §3.1 says: (t−1)·interval ≥ max(h, w)
    library = library_positions(adapter, batch.inputs)[:, 0]
    assert (not torch.equal(library, expected)) == ((t - 1) * INTERVAL[family] >= max(h, w))

    steps = 3
    with PositionRecorder(adapter) as recorder, torch.inference_mode():
        adapter.model.generate(**batch.inputs, do_sample=False, min_new_tokens=steps + 1, max_new_tokens=steps + 1)
    prefill, *decoding = [positions[-3:, 0] for positions in recorder.seen]  # the 3 M-RoPE rows
    assert torch.equal(prefill, expected)
    last = int(expected[:, -1].max())  # the last prompt token (text): its position is the sequence's largest
    assert last == int(expected.max())
    assert [p.tolist() for p in decoding] == [[[last + k]] * 3 for k in range(1, steps + 1)]


def test_image_passes_and_call_3_keep_the_library_positions(adapters, videos):
    """One temporal slot: the library's image positions already are the 4.52 ones, so frame passes get none of
    ours; call 3 (text only) runs on plain 1-D positions."""
    adapter = adapters["qwen2_5_vl"]
    frames = videos[(320, 240)][:2]
    video = adapter.video_batch(frames, "x")
    batch = adapter.frame_batch(frames, "the bed.", video)
    assert "position_ids" not in batch.inputs
    library = library_positions(adapter, batch.inputs)
    for row in range(2):
        ids = batch.inputs["input_ids"][row].tolist()
        assert torch.equal(library[:, row], rule_4_52(ids, adapter.image_token_id, batch.grid, 1.0))

    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=2, layer_end=4, max_new_tokens=2))
    try:
        with PositionRecorder(adapter) as recorder:
            pipeline.generate_text("Which object? Answer with one word.")
    finally:
        pipeline.capture.detach()
    prefill = recorder.seen[0][-3:, 0]
    assert torch.equal(prefill, torch.arange(prefill.shape[1]).expand(3, -1))


@pytest.mark.parametrize("family, size", [("qwen2_5_vl", (320, 240)), ("qwen2_vl", (176, 144))])
def test_video_maps_equal_the_literal_oracle_on_4_52_positions(adapters, videos, family, size):
    """The streamed rollout of a video pass equals the literal oracle (SPEC §0.5 T1) computed on a forward that
    is given the positions of this file's rule; the library's positions would give other maps."""
    adapter = adapters[family]
    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=2, layer_end=4))
    try:
        batch = adapter.video_batch(videos[size], "the bed on the left.")
        (streamed,), _ = pipeline.capture_pass(batch, decode=False)
        inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
        ids = inputs["input_ids"][0].tolist()
        oracle_positions = rule_4_52(ids, adapter.video_token_id, batch.grid, INTERVAL[family])[:, None]
        maps = {}
        for name, positions in {"4.52": oracle_positions, "library": None}.items():
            literal = make_rollout("literal", batch.visual_mask, batch.key_mask)
            with pipeline.capture.armed(literal, batch.seq_len), torch.inference_mode():
                adapter.model(**inputs, position_ids=positions, use_cache=False)
            maps[name] = literal.rows()[0][batch.visual_mask[0]].reshape(batch.grid)
    finally:
        pipeline.capture.detach()
    assert_t1(streamed, maps["4.52"])
    assert (maps["library"] - maps["4.52"]).abs().max() > 1e-3 * maps["4.52"].abs().max()


def test_stage1_cache_records_the_position_rule_and_backend(tmp_path, adapters, videos, capsys):
    """A 16-frame 320×240 Qwen2.5-VL stage-1 run: its cache says which rule and processor backend made it; a cache
    made before the rule was recorded counts as made with other settings."""
    from evaluation.inference_attn_map_qwenvl import main

    root = tmp_path / "data"
    frames = root / "davis17/valid/JPEGImages/clip"
    frames.mkdir(parents=True)
    for path in videos[(320, 240)]:
        (frames / path.name).write_bytes(path.read_bytes())
    meta = {"videos": {"clip": {"frames": [p.stem for p in videos[(320, 240)]],
                                "expressions": {"0": {"exp": "the bed", "obj_id": "1"}}}}}
    meta_file = root / "davis17/meta_expressions/valid/meta_expressions.json"
    meta_file.parent.mkdir(parents=True)
    meta_file.write_text(json.dumps(meta))
    folder = tmp_path / "caches"
    args = ["--dataset", "davis", "--data_root", str(root), "--version", adapters["qwen2_5_vl"].checkpoint,
            "--model_name", "tiny", "--precision", "fp32", "--max_new_tokens", "2", "--device", "cpu",
            "--attn_save_path", str(folder)]
    assert main(args) == 0
    cache = load_cache(folder / "clip_0.safetensors")
    settings = cache.meta["settings"]
    assert settings["mrope_positions"] == PAPER_MROPE == "transformers-4.52"
    assert settings["image_processor"] == "Qwen2VLImageProcessorPil (PIL backend)"
    assert settings["image_processor_backend"] == "pil"
    assert cache.meta["video_grid"] == [8, 9, 11]

    # the same cache without the rule (as written before it was recorded) is not reused
    old_meta = {k: v for k, v in cache.meta.items() if k != "format_version"}
    old_meta["settings"] = {k: v for k, v in settings.items() if k != "mrope_positions"}
    save_cache(cache.path, load_file(str(cache.path)), old_meta)
    capsys.readouterr()
    assert main(args) != 0
    assert "other settings (settings.mrope_positions)" in capsys.readouterr().err
