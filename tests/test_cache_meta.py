"""The cache schema (SPEC §12.2): one dataclass that stage 1 writes and stage 2 reads and compares."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open

from model.cache import (MATCHED_SETTINGS, METADATA_KEY, CacheMeta, expected_meta, load_cache, save_cache,
                         setting_mismatches)

#: the key order of SPEC §12.2's list, which is also the order of the stored JSON object
SPEC_KEYS = ["format_version", "family", "checkpoint", "checkpoint_revision", "num_layers", "layer_start",
             "layer_end", "num_input_frames", "frames_count", "key_frame_indices", "frame0_size", "video_grid",
             "frame_grid", "tiling", "prompt_versions", "prompts", "texts", "settings", "versions", "dataset",
             "video_key", "exp_id", "expression"]


def minimal_meta(**overrides) -> CacheMeta:
    values = dict(family="qwen2_5_vl", num_input_frames=3, frames_count=5, key_frame_indices=[0, 2, 4],
                  frame0_size=[6, 8])
    return CacheMeta(**{**values, **overrides})


def maps(T: int = 3) -> dict[str, torch.Tensor]:
    return {name: torch.rand(T, 2, 2) for name in ("obj_video", "obj_frame", "bg_video", "bg_frame")}


def test_record_keys_follow_spec_order_and_every_key_is_documented():
    assert list(minimal_meta().to_record()) == SPEC_KEYS
    assert all(f.metadata["doc"] for f in fields(CacheMeta))
    assert MATCHED_SETTINGS == ("family", "checkpoint", "num_layers", "layer_start", "layer_end",
                                "num_input_frames", "prompt_versions")


def test_the_five_keys_every_loader_needs_are_required():
    with pytest.raises(TypeError):
        CacheMeta(family="qwen2_5_vl", num_input_frames=3, frames_count=5, key_frame_indices=[0])


def test_a_saved_record_is_the_json_of_the_dataclass_and_reads_back(tmp_path):
    meta = minimal_meta(checkpoint="ckpts/x", layer_start=1, layer_end=2, num_layers=2,
                        prompt_versions={"obj": 0, "bg": 0, "choice": 0}, expression="the dog")
    path = save_cache(tmp_path / "v_0.safetensors", maps(), meta)
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.metadata()[METADATA_KEY]
    assert stored == json.dumps(meta.to_record(), ensure_ascii=False)
    assert load_cache(path).record == meta


def test_unknown_keys_of_a_newer_writer_are_ignored_on_reading():
    record = {**minimal_meta().to_record(), "added_later": 1}
    assert CacheMeta.from_record(record) == minimal_meta()


def test_expected_meta_checks_only_what_the_run_knows():
    expected = expected_meta(num_input_frames=3, layer_start=1, layer_end=2, prompt_versions=(0, 0, 0))
    assert set(expected) == {"layer_start", "layer_end", "num_input_frames", "prompt_versions"}
    record = minimal_meta(layer_start=1, layer_end=2, prompt_versions={"obj": 0, "bg": 0, "choice": 0},
                          checkpoint="anything").to_record()
    assert setting_mismatches(record, expected) == []
    stage1 = expected_meta(num_input_frames=3, layer_start=1, layer_end=3, prompt_versions=(0, 1, 0),
                           family="qwen2_5_vl", checkpoint="ckpts/x", num_layers=4,
                           resolution={"attn_max_token": 400})
    assert setting_mismatches({**record, "settings": {"attn_max_token": 200}}, stage1) == [
        "checkpoint", "num_layers", "layer_end", "prompt_versions", "settings.attn_max_token"]
