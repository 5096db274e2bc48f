"""The settings registry (issue 15): every parser is built from model/settings.py, with one default and one help
text per flag, and the family input flags come from the families AdapterOptions declares (SPEC §13.2)."""
from __future__ import annotations

import argparse

import pytest

import demo
from model import webdemo
from model.adapters.options import AdapterOptions
from model.parsers import build_keypoint_parser, build_mask_parser, build_stage1_parser, family_flags
from model.settings import LIVE_ATTN_MAX_BATCH, SETTINGS, SegmentSettings, add_settings, default_of


def parsers() -> dict[str, argparse.ArgumentParser]:
    stage1 = {f"stage 1 ({module})": build_stage1_parser("x", family_flags(module))
              for module in ("qwen", "qwen3_vl", "internvl", "llava_onevision")}
    return {**stage1, "masks": build_mask_parser(), "keypoints": build_keypoint_parser(), "demo": demo.build_parser(),
            "web demo": webdemo.build_parser()}


@pytest.mark.parametrize("name", list(parsers()))
def test_every_flag_is_a_registry_setting_with_its_default(name):
    parser = parsers()[name]
    flags = [action for action in parser._actions if action.dest != "help"]
    assert flags
    for action in flags:
        setting = SETTINGS[action.dest]  # KeyError: a flag defined outside the registry
        assert action.option_strings[0] == f"--{setting.name}"
        expected = list(setting.default) if isinstance(setting.default, tuple) else setting.default
        if not (name in ("demo", "web demo") and action.dest in ("vis_save_path", "version", "attn_max_batch")):
            assert action.default == expected, (name, action.dest)


def test_family_flags_follow_the_families_that_read_them():
    qwen = ("attn_max_token", "attn_resize_scale", "attn_max_token_per_image")
    assert family_flags("qwen") == qwen and family_flags("qwen3_vl") == qwen
    assert family_flags("internvl") == ("max_patches",)
    assert family_flags("llava_onevision") == ()
    options = AdapterOptions()
    assert {name: getattr(options, name) for name in AdapterOptions.names()} == \
        {"attn_max_token": 400, "attn_resize_scale": 2, "attn_max_token_per_image": -1, "max_patches": 12}
    assert all(default_of(name) == getattr(options, name) for name in AdapterOptions.names())


def test_live_settings_take_the_registry_defaults():
    settings = SegmentSettings()
    for name in SegmentSettings.field_names():
        expected = LIVE_ATTN_MAX_BATCH if name == "attn_max_batch" else default_of(name)
        assert getattr(settings, name) == expected, name
    # the paper's values (SPEC §4.7, §8.3, §8.7, §2.3)
    assert (settings.max_new_tokens, settings.point_threshold, settings.final_score_threshold,
            settings.num_input_frames) == (128, 0.8, 0.8, 16)
    parsed = demo.parse_args(["--video_path", "v", "--exp", "e", "--num_input_frames", "8"])
    assert SegmentSettings.from_args(parsed) == SegmentSettings(num_input_frames=8)


def test_a_parser_cannot_name_an_unknown_setting():
    with pytest.raises(KeyError, match="no_such_flag"):
        add_settings(argparse.ArgumentParser(), ("dataset", "no_such_flag"))
    with pytest.raises(KeyError, match="fusion"):
        add_settings(argparse.ArgumentParser(), ("dataset",), {"fusion": {"default": "video"}})


def test_library_errors_name_the_argument_and_scripts_the_flag(capsys):
    from model.jobs.benchmarks import shard_jobs
    from model.utils.errors import EXIT_USER_ERROR, SettingError, run_cli

    with pytest.raises(SettingError, match=r"^subset_num must be a positive integer, got 0$") as caught:
        shard_jobs([], 0, 0)
    assert caught.value.as_flag() == "--subset_num must be a positive integer, got 0"

    def main(argv):
        shard_jobs([], 0, 0)

    with pytest.raises(SystemExit) as exited:
        run_cli(main, [])
    assert exited.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: --subset_num must be a positive integer, got 0\n"
