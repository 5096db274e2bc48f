"""The demo (SPEC §1.5, §12.5, §13.3) and the Python API on tiny random-weight Qwen2.5-VL and SAM2 checkpoints.

The demo runs as a subprocess on a frame folder (given with a trailing slash) and on the repository's short
``tests/data/dog.mp4``; the API runs in process. Random weights make the masks meaningless, so the tests check the
layout arithmetic, sizes, counts, formats and the literal tiles, not the segmentation.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import pytest
from PIL import Image

from conftest import DOG_MP4, REPO, copy_frames
from model.api import Segmenter, SegmentSettings, VideoSource, segment, video_name
from model.sam.prompting import candidate_points
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint
from model.utils.errors import DecafError
from model.utils.video import sample_indices

N = 4  # --num_input_frames
DOG_FRAMES = 12  # frames of tests/data/dog.mp4
TINY = dict(num_input_frames=N, attn_max_token=16, max_new_tokens=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpts")
    qwen = build_tiny_qwen_checkpoint(root / "tiny-qwen2.5-vl", "qwen2_5_vl")
    config, overrides = build_tiny_sam2_checkpoint(root / "sam2.pt", image_size=256)
    return {"version": qwen, "sam2": root / "sam2.pt", "config": config, "overrides": overrides}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """Six 960×540 bedroom frames; T = 4 of F = 6 are sampled."""
    folder = tmp_path_factory.mktemp("frames") / "bedroom_clip"
    copy_frames(folder, 6, step=4)
    return folder


@pytest.fixture(scope="module")
def dog_mp4(tmp_path_factory) -> Path:
    """The repository's 12-frame cut of 01_dog.mp4 (1280×720, 29.97 fps), copied into a temp folder."""
    return Path(shutil.copyfile(DOG_MP4, tmp_path_factory.mktemp("video") / "dog.mp4"))


def run_demo(ckpts: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO / "demo.py"), "--version", str(ckpts["version"]),
               "--vision_pretrained", str(ckpts["sam2"]), "--vision_pretrained_config", ckpts["config"],
               "--sam2_overrides", *ckpts["overrides"], "--precision", "fp32", "--device", "cpu",
               "--num_input_frames", str(N), "--attn_max_token", "16", "--max_new_tokens", "2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def expected_stacked_shape(frame_h: int, frame_w: int, num_sampled: int) -> tuple[int, int, int]:
    """SPEC §12.5: 100-px header, T rows of ⌊H₀/4⌋ with 10-px bars between them; 5 tiles of ⌊W₀/4⌋ and 4 bars."""
    return 100 + num_sampled * (frame_h // 4) + 10 * (num_sampled - 1), 5 * (frame_w // 4) + 4 * 10, 3


def png_mask(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L" and image.palette is None and image.size == size_hw[::-1], path
        values = np.asarray(image)
    assert set(np.unique(values)) <= {0, 255}, path
    return values


def decoded_frames(path: Path) -> tuple[int, float, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    fps = capture.get(cv2.CAP_PROP_FPS)
    count, size = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, size = count + 1, frame.shape[:2]
    capture.release()
    return count, fps, size


# --------------------------------------------------------------------------------------------------- demo.py
def test_demo_on_frame_folder_with_trailing_slash(tmp_path, ckpts, clip):
    out = tmp_path / "vis"
    result = run_demo(ckpts, "--video_path", f"{clip}/", "--exp", "  the bed \n", "--vis_save_path", str(out),
                      "--save_per_frame", "--save_video", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("loading", "stage 1", "fusion", "SAM2 on 6 frames"):  # one progress line per stage
        assert stage in result.stderr
    names = [f"{i:05d}" for i in range(6)]
    sampled = [names[k] for k in sample_indices(6, N)]  # [0, 1, 3, 5]

    stacked = cv2.imread(str(out / "bedroom_clip_all.png"))  # vid_name robust to the trailing '/' (§14 #45)
    assert stacked.shape == expected_stacked_shape(540, 960, len(sampled)) == (670, 1240, 3)
    header = stacked[:100]
    assert (header == 0).all(axis=2).sum() > 100 and (header == 255).all(axis=2).mean() > 0.9  # black text, white
    assert not stacked[100:235, 240:250].any() and not stacked[235:245].any()  # vertical and horizontal bars
    first_frame = cv2.resize(cv2.imread(str(clip / "00000.jpg")), (240, 135))
    # tile 1 = the frame, its name on a black box in the corner
    assert np.array_equal(stacked[100 + 30:235, :240], first_frame[30:])
    assert (stacked[100:103, :60] == 0).all() and (stacked[100:130, :100] == 255).any()
    for column in range(5):  # a title above each column, at the foot of the header
        assert (header[70:99, column * 250: column * 250 + 60] < 128).any(), column

    root = out / "bedroom_clip"
    for folder in ("img", "attn_map", "coarse_mask", "points"):
        files = sorted(p.stem for p in (root / folder).glob("*.png"))
        assert files == sampled, folder
        assert cv2.imread(str(root / folder / f"{sampled[0]}.png")).shape == (270, 480, 3)
    assert sorted(p.stem for p in (root / "sam_mask").glob("*.png")) == names  # all F frames
    assert np.array_equal(cv2.imread(str(root / "img" / "00003.png")),
                          cv2.resize(cv2.imread(str(clip / "00003.jpg")), (480, 270)))
    for name in names:
        png_mask(root / "masks" / f"{name}.png", (540, 960))
    assert decoded_frames(out / "bedroom_clip_sam_mask.mp4") == (6, 10.0, (540, 960))  # a folder: 10 fps
    manifest = json.loads(next(out.glob("manifest_*.json")).read_text())
    assert manifest["command"] == "demo" and manifest["resolved"]["key_frame_indices"] == [0, 1, 3, 5]
    any_mask = any(png_mask(root / "masks" / f"{name}.png", (540, 960)).any() for name in names)
    assert manifest["empty_sam2_mask"] is (not any_mask)  # an empty result is recorded, and said in the log
    assert ("SAM2 found no object" in result.stdout) is (not any_mask)
    assert manifest["resolved"]["layer_range"] == [2, 4]  # auto = half of the tiny model's 4 layers
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporary siblings


def test_demo_on_mp4_file(tmp_path, ckpts, dog_mp4):
    out = tmp_path / "vis"
    result = run_demo(ckpts, "--video_path", str(dog_mp4), "--exp", "the dog", "--vis_save_path", str(out),
                      "--save_video", "--attn_max_batch", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stacked = cv2.imread(str(out / "dog_all.png"))  # the stem of the video file
    assert stacked.shape == expected_stacked_shape(720, 1280, N) == (850, 1640, 3)
    count, fps, size = decoded_frames(out / "dog_sam_mask.mp4")
    assert (count, size) == (DOG_FRAMES, (720, 1280)) and fps == pytest.approx(29.97, abs=0.01)  # source fps
    masks = sorted((out / "dog" / "masks").glob("*.png"))
    assert [p.stem for p in masks] == [f"{i:05d}" for i in range(DOG_FRAMES)]
    png_mask(masks[-1], (720, 1280))
    assert not (out / "dog" / "img").exists()  # no --save_per_frame


def test_demo_missing_checkpoint_is_one_line(tmp_path, ckpts, clip):
    missing = dict(ckpts, version=tmp_path / "ckpts" / "Qwen2.5-VL-7B-Instruct")
    result = run_demo(missing, "--video_path", str(clip), "--exp", "the bed", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "ckpts/README.md" in result.stderr
    assert str(missing["version"]) in result.stderr


def test_demo_help_explains_every_flag():
    spec = importlib.util.spec_from_file_location("decaf_demo_script", REPO / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for flag in ("--video_path", "--exp", "--vis_save_path", "--save_per_frame", "--save_video", "--save_masks",
                 "--version", "--vision_pretrained", "--vision_pretrained_config", "--point_threshold",
                 "--final_score_threshold", "--attn_max_batch", "--num_input_frames", "--attn_layer_idx_start",
                 "--attn_layer_idx_end", "--attn_max_token", "--attn_resize_scale", "--attn_max_token_per_image",
                 "--max_patches", "--prompt_obj_ver", "--prompt_bg_ver", "--prompt_obj_cnt_ver", "--precision",
                 "--attn_implementation", "--device", "--sam2_overrides", "--max_new_tokens"):
        assert flag in flags, flag
    assert all(action.help for action in parser._actions)
    defaults = parser.parse_args(["--video_path", "v", "--exp", "e"])
    assert (defaults.vis_save_path, defaults.version, defaults.attn_max_batch) == (
        "./results/decaf_demo/", "ckpts/Qwen2.5-VL-7B-Instruct", 8)
    assert (defaults.num_input_frames, defaults.attn_layer_idx_start, defaults.attn_max_token,
            defaults.attn_resize_scale, defaults.point_threshold, defaults.final_score_threshold) == (
        16, "auto", 400, 2, 0.8, 0.8)
    assert defaults.vision_pretrained_config == "sam2_hiera_l.yaml" and defaults.save_masks


# ------------------------------------------------------------------------------------------------ Python API
def test_segmenter_returns_masks_for_every_frame(ckpts, clip):
    with Segmenter(ckpts["version"], ckpts["sam2"], ckpts["config"], settings=SegmentSettings(**TINY),
                   device="cpu", precision="fp32", sam2_overrides=ckpts["overrides"]) as segmenter:
        results = [segmenter.segment(clip, " the bed\n"), segmenter.segment(clip, "is it a lamp?")]
    for result in results:
        assert result.masks.shape == (6, 540, 960) and result.masks.dtype == np.uint8
        assert set(np.unique(result.masks)) <= {0, 255}
        assert np.array_equal(result.bool_masks, result.masks > 0)
        assert result.key_frame_indices == [0, 1, 3, 5] and result.frame_size == (540, 960)
        assert result.phi.shape[0] == 4 and float(result.phi.max()) <= 1.0
        assert result.coarse_masks.shape == (4, 540, 960)
        assert [len(c) for c in result.candidate_points] == [len(c) for c in candidate_points(result.phi, 0.8)]
        assert len(result.texts["obj_cls_frame"]) == 4 and isinstance(result.texts["obj_cls_video"], str)
        assert result.source.name == "bedroom_clip" and result.source.fps is None
        assert set(result.timings) == {"stage1", "fusion", "sam2"}
    # §1.5 strips the demo input first, then §2.1 appends '.' (a '?' ending is kept)
    assert results[0].expression == "the bed" and results[0].prompts["obj"].startswith("the bed. \n")
    assert results[1].prompts["obj"].startswith("is it a lamp? \n")


def test_segment_on_a_video_file(ckpts, dog_mp4):
    result = segment(dog_mp4, "the dog", version=ckpts["version"], vision_pretrained=ckpts["sam2"],
                     vision_pretrained_config=ckpts["config"], device="cpu", precision="fp32",
                     sam2_overrides=ckpts["overrides"], point_threshold=0.9, **TINY)
    frames_dir = result.frame_paths[0].parent
    assert result.masks.shape == (DOG_FRAMES, 720, 1280)
    assert result.source.name == "dog" and result.source.fps == pytest.approx(29.97, abs=0.01)
    assert result.frame_names == [f"{i:05d}" for i in range(DOG_FRAMES)] and frames_dir.is_dir()
    result.close()  # the decoded frames are temporary
    assert not frames_dir.exists()


def test_api_errors_are_one_line(tmp_path, ckpts, clip):
    missing_sam2 = tmp_path / "ckpts" / "sam2-hiera-large" / "sam2_hiera_large.pt"
    with pytest.raises(DecafError, match="SAM2 checkpoint not found.*ckpts/README.md"):
        Segmenter(ckpts["version"], missing_sam2, device="cpu")
    with pytest.raises(DecafError, match="unknown SAM2 config 'sam3.yaml'"):
        Segmenter(ckpts["version"], ckpts["sam2"], "sam3.yaml", device="cpu")
    with pytest.raises(DecafError, match="checkpoint folder not found.*ckpts/README.md"):
        segment(clip, "x", version=tmp_path / "nope", vision_pretrained=ckpts["sam2"])
    with pytest.raises(DecafError, match="neither a frame folder nor a video file"):
        VideoSource.open(tmp_path / "missing.mp4")
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(DecafError, match="notes.mp4"):
        VideoSource.open(not_a_video)
    with pytest.raises(TypeError, match="unknown settings"):
        segment(clip, "x", num_frames=4)
    with pytest.raises(DecafError, match="attn_max_batch"):
        SegmentSettings(attn_max_batch=0)


def test_video_name_is_robust(tmp_path, clip, dog_mp4, monkeypatch):
    assert video_name(f"{clip}/") == video_name(f"{clip}//") == video_name(clip) == "bedroom_clip"
    assert video_name(dog_mp4) == "dog"
    monkeypatch.chdir(clip)
    assert video_name(".") == video_name("./") == "bedroom_clip"


def test_adapter_registry_reads_the_model_type(tmp_path, ckpts):
    from model.adapters import ADAPTERS, adapter_for_checkpoint, adapter_for_model_type
    from model.adapters.qwen import QwenVLAdapter

    assert adapter_for_checkpoint(ckpts["version"]) is QwenVLAdapter
    for model_type in ADAPTERS:  # every family imports lazily and declares its model_type
        assert model_type in adapter_for_model_type(model_type).model_types
    assert adapter_for_model_type("llava_onevision").__name__ == "LlavaOnevisionAdapter"
    assert adapter_for_model_type("internvl").__name__ == "InternVLAdapter"
    folder = tmp_path / "renamed-qwen"  # the folder name plays no role (§14 #27)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(DecafError, match="renamed-qwen.*'llava'"):
        adapter_for_checkpoint(folder)


def test_bad_frames_are_found_before_any_model_loads(tmp_path, ckpts, clip, monkeypatch):
    """A truncated frame outside the sampled ones, or mixed sizes, fail segment() before a model is built."""
    import model.api as api

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the frames were checked")

    monkeypatch.setattr(api, "Segmenter", no_model)
    truncated = tmp_path / "truncated"
    shutil.copytree(clip, truncated)
    jpeg = (truncated / "00002.jpg").read_bytes()  # frame 2 is not among the sampled [0, 1, 3, 5]
    (truncated / "00002.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    common = dict(version=ckpts["version"], vision_pretrained=ckpts["sam2"], vision_pretrained_config=ckpts["config"])
    with pytest.raises(DecafError, match="cannot decode image .*00002.jpg"):
        segment(truncated, "the bed", **common, **TINY)
    mixed = tmp_path / "mixed"
    shutil.copytree(clip, mixed)
    Image.open(mixed / "00004.jpg").resize((480, 270)).save(mixed / "00004.jpg")
    with pytest.raises(DecafError, match="frame 00004.jpg is 480x270 but frame 0 is 960x540"):
        segment(mixed, "the bed", **common, **TINY)
    with pytest.raises(DecafError, match="the expression is empty"):
        segment(clip, "  \n", **common, **TINY)


def test_a_video_session_shares_the_prefixes_and_changes_nothing(ckpts, clip):
    """Segmenter.video_session (SPEC §5.8f): the second expression of a video prefills only its own text; maps
    within T1 of separate calls, the same answers and masks."""
    expressions = ["the bed", "is it a lamp?", "the window on the left"]
    with Segmenter(ckpts["version"], ckpts["sam2"], ckpts["config"], settings=SegmentSettings(**TINY),
                   device="cpu", precision="fp32", sam2_overrides=ckpts["overrides"]) as segmenter:
        separate = [segmenter.segment(clip, exp) for exp in expressions]
        assert segmenter.pipeline.prefix_stats["continued"] == 0
        with segmenter.video_session():
            shared = [segmenter.segment(clip, exp) for exp in expressions]
        stats = dict(segmenter.pipeline.prefix_stats)
    assert stats["prefixes"] > 0 and stats["continued"] > stats["prefixes"]
    for a, b in zip(separate, shared):
        assert torch.allclose(a.phi, b.phi, rtol=0, atol=1e-5)  # T1 (SPEC §0.5)
        assert a.texts == b.texts
        assert np.array_equal(a.masks, b.masks)
