"""Stage 2 and the keypoint branch end to end on a synthetic Ref-DAVIS17 layout (SPEC §6–§9, §10.9, §12).

The benchmark is built in a temporary folder from real bedroom frames (downscaled to 240×135 to keep SAM2 fast),
with hand-made cache files carrying the metadata stage 1 writes. The SAM2 run uses the tiny random-weight Hiera-T
checkpoint at 256 px and runs the real script as a subprocess.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, copy_frames, subprocess_env
from model.cache import CacheMeta, load_cache, save_cache
from model.maps.coarse_masks import coarse_masks
from model.maps.fusion import fuse_cache
from model.maps.keypoints import extract_keypoints
from model.stage2 import build_mask_parser, keypoint_main, mask_main, resolve_layout, resolve_run_settings
from model.utils.errors import EXIT_JOBS_FAILED, EXIT_USER_ERROR, DecafError, run_cli
from model.utils.video import sample_indices

MODEL = "qwen2-5-vl-7b-rvos"
N = 4  # --num_input_frames: small clips keep the tiny SAM2 fast; T < F so unsampled frames exist
SIZE = (135, 240)  # (H₀, W₀)
RUN = f"F{N}_L14--1"
CACHE_DIR = Path("attn_weights") / MODEL / RUN / "davis_valid"
ATTN_OUT = Path("outputs") / MODEL / RUN / f"inf-uniform-F{N}-attn-mask" / "davis_valid"
SAM_OUT = Path("outputs") / MODEL / RUN / f"inf-uniform-F{N}-sam-mask" / "davis_valid"
KP_OUT = Path("outputs") / MODEL / RUN / f"inf-uniform-F{N}-keypoint" / "davis_valid"
BASE_ARGS = ["--dataset", "davis", "--data_root", "bench", "--model_name", MODEL, "--num_input_frames", str(N),
             "--attn_layer_idx_start", "14"]


# ----------------------------------------------------------------------------------------------- the benchmark
def make_video(root: Path, video: str, count: int, start: int) -> list[str]:
    """``count`` bedroom frames, downscaled to 240×135, as a DAVIS JPEGImages folder; returns the frame names."""
    folder = root / "davis17" / "valid" / "JPEGImages" / video
    for path in copy_frames(folder, count, start=start, step=7):
        small = cv2.resize(cv2.imread(str(path)), (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(path), small)
    return [f"{i:05d}" for i in range(count)]


def write_meta(root: Path, videos: dict[str, tuple[list[str], list[str]]]) -> None:
    """A Ref-DAVIS17 meta file: video → (frame names, expression texts)."""
    meta = {"videos": {video: {"frames": frames,
                               "expressions": {str(i): {"exp": text, "obj_id": "1"} for i, text in enumerate(exps)}}
                       for video, (frames, exps) in videos.items()}}
    path = root / "davis17" / "meta_expressions" / "valid" / "meta_expressions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta))


def blob(shape: tuple[int, int, int], amplitude: float, seed: int) -> torch.Tensor:
    """A one-cell bump left of the centre of every slice plus noise: a rollout map with one clear object, which
    gives only a few candidate points per frame (fast SAM2 prompting)."""
    t, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    bump = amplitude * torch.exp(-((yy - h // 2) ** 2 + (xx - (2 * w) // 5) ** 2) / (2 * 0.5 ** 2))
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.002
    return bump.expand(t, h, w) + noise


def write_cache(path: Path, video: str, exp_id: str, frames_count: int, *, zero: bool = False,
                obj_only: bool = False, layer_start: int = 14, seed: int = 0) -> Path:
    """A cache file with the metadata stage 1 records (SPEC §12.2), Qwen2.5-VL grids (⌈T/2⌉, 4, 7) / (T, 8, 14)."""
    keys = sample_indices(frames_count, N)
    T = len(keys)
    video_grid, frame_grid = (math.ceil(T / 2), 4, 7), (T, 8, 14)
    if zero:  # object = background everywhere: no contrast, Φ ≡ 0 (SPEC §8.9)
        maps = {"obj_video": torch.full(video_grid, 0.01), "obj_frame": torch.full(frame_grid, 0.02)}
        maps.update(bg_video=maps["obj_video"].clone(), bg_frame=maps["obj_frame"].clone())
    else:
        maps = {"obj_video": blob(video_grid, 0.02, seed), "obj_frame": blob(frame_grid, 0.03, seed + 1),
                "bg_video": blob(video_grid, 0.0, seed + 2), "bg_frame": blob(frame_grid, 0.0, seed + 3)}
    if obj_only:
        maps = {k: v for k, v in maps.items() if k.startswith("obj")}
    meta = CacheMeta(**{
        "family": "qwen2_5_vl", "checkpoint": "ckpts/Qwen2.5-VL-7B-Instruct", "checkpoint_revision": None,
        "num_layers": 28, "layer_start": layer_start, "layer_end": 28, "num_input_frames": N,
        "frames_count": frames_count, "key_frame_indices": keys, "frame0_size": list(SIZE),
        "video_grid": list(video_grid), "frame_grid": list(frame_grid), "tiling": None,
        "prompt_versions": {"obj": 0, "bg": 0, "choice": 0},
        "prompts": {"obj": "…", "choice": "…", "bg": None if obj_only else "…"},
        "texts": {"obj_cls_video": "bed", "obj_cls_frame": ["bed"] * T, "obj_name": None if obj_only else "bed",
                  "bg_caption_video": None, "bg_caption_frame": None},
        "settings": {"attn_max_token": 400, "attn_resize_scale": 2, "attn_max_token_per_image": -1,
                     "max_patches": 12, "attn_max_batch": 4, "attn_implementation": "sdpa",
                     "model_dtype": "bfloat16", "image_processor": "fast", "rollout_impl": "streamed"},
        "versions": {"decaf": "0.1.0", "torch": torch.__version__, "transformers": "5"},
        "dataset": "davis", "video_key": video, "exp_id": exp_id, "expression": "the bed",
    })
    return save_cache(path, maps, meta)


def png(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "L" and image.palette is None, f"{path}: mode {image.mode}"
    return np.array(image)


def manifests(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("manifest_*.json"))]


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------------- SAM2, end to end
@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory) -> tuple[Path, str, list[str]]:
    from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint

    path = tmp_path_factory.mktemp("sam2") / "tiny_sam2.pt"
    config, overrides = build_tiny_sam2_checkpoint(path, image_size=256, seed=0)
    return path, config, overrides


def test_masks_end_to_end_with_sam2_and_resume(tmp_path: Path, tiny_sam2):
    bench = tmp_path / "bench"
    frames_a = make_video(bench, "bedroom", 6, start=0)   # F = 6 > N: sampled frames 0, 1, 3, 5
    frames_b = make_video(bench, "bedroom2", 3, start=12)  # F = 3 < N: T = 3 (odd), t_v = 2
    write_meta(bench, {"bedroom": (frames_a, ["the bed", "the lamp"]), "bedroom2": (frames_b, ["the bed"])})
    write_cache(tmp_path / CACHE_DIR / "bedroom_0.safetensors", "bedroom", "0", 6)
    write_cache(tmp_path / CACHE_DIR / "bedroom_1.safetensors", "bedroom", "1", 6, zero=True)
    write_cache(tmp_path / CACHE_DIR / "bedroom2_0.safetensors", "bedroom2", "0", 3, seed=7)
    checkpoint, config, overrides = tiny_sam2
    args = [*BASE_ARGS, "--predict_attn_mask", "--predict_sam_mask", "--use_saved_attn",
            "--vision_pretrained", str(checkpoint), "--vision_pretrained_config", config,
            "--device", "cpu", "--sam2_overrides", *overrides]

    first = run_script("inference_attn_mask.py", args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # progress: one bar over the videos, transient bars per SAM2 phase (issue 13)
    assert "stage 2: " in first.stderr and "SAM2 phase 1" in first.stderr and "SAM2 phase 2" in first.stderr
    # without sam2._C the user reads it once, from us, and not again from SAM2 (issue 14)
    if "SAM2 _C extension not available" in first.stderr:
        assert first.stderr.count("SAM2 _C extension not available") == 1
        assert "Skipping the post-processing step" not in first.stderr

    # coarse masks: one PNG per sampled frame, named after k_t, bit-identical to §6 + §7 on the cache
    for video, exp, names, keys in (("bedroom", "0", frames_a, [0, 1, 3, 5]), ("bedroom2", "0", frames_b, [0, 1, 2])):
        folder = tmp_path / ATTN_OUT / video / exp
        assert sorted(p.name for p in folder.iterdir()) == [f"{names[k]}.png" for k in keys]
        cache = load_cache(tmp_path / CACHE_DIR / f"{video}_{exp}.safetensors")
        expected = coarse_masks(fuse_cache(cache), SIZE)
        got = np.stack([png(folder / f"{names[k]}.png") for k in keys])
        assert np.array_equal(got, expected) and got.any()
        # SAM masks: every frame, (H₀, W₀), values {0, 255}
        sam_folder = tmp_path / SAM_OUT / video / exp
        assert sorted(p.name for p in sam_folder.iterdir()) == [f"{n}.png" for n in names]
        for path in sam_folder.iterdir():
            mask = png(path)
            assert mask.shape == SIZE and set(np.unique(mask)) <= {0, 255}

    # the all-zero map: empty masks of both kinds, a warning, and a degenerate entry in both manifests
    assert not any(png(p).any() for p in (tmp_path / ATTN_OUT / "bedroom" / "1").iterdir())
    assert len(list((tmp_path / SAM_OUT / "bedroom" / "1").iterdir())) == 6
    assert not any(png(p).any() for p in (tmp_path / SAM_OUT / "bedroom" / "1").iterdir())
    assert "bedroom/1: degenerate" in first.stderr
    for out in (ATTN_OUT, SAM_OUT):
        (manifest,) = manifests(tmp_path / out)
        assert manifest["failures"] == [] and manifest["jobs"]["done"] == 3
        assert {d["job"] for d in manifest["degenerate"]} == {"bedroom/1"}
        assert {d["reason"].split(":")[0] for d in manifest["degenerate"]} == {"attn-mask", "sam-mask"}
        assert isinstance(manifest["sam2_extension_loaded"], bool)
        assert manifest["arguments"]["predict_sam_mask"] is True and "torch" in manifest["versions"]

    # resume: finished folders are skipped; a folder with a missing PNG, a removed folder and a partial
    # temporary sibling (a killed run) are not trusted
    untouched = tmp_path / SAM_OUT / "bedroom" / "1" / "00002.png"
    stamp = untouched.stat().st_mtime_ns
    (tmp_path / ATTN_OUT / "bedroom" / "0" / "00003.png").unlink()
    shutil.rmtree(tmp_path / SAM_OUT / "bedroom2" / "0")
    partial = tmp_path / SAM_OUT / "bedroom2" / ".0.tmp-999999-dead"
    partial.mkdir()
    cv2.imwrite(str(partial / "00000.png"), np.zeros(SIZE, np.uint8))
    sam_a = tmp_path / SAM_OUT / "bedroom" / "0" / "00004.png"
    sam_a_stamp = sam_a.stat().st_mtime_ns

    # the rerun batches SAM2 objects (--sam2_batch does not name the output folder: masks are the same up to
    # rounding, tests/test_sam2_prompting.py)
    second = run_script("inference_attn_mask.py", [*args, "--sam2_batch", "4"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert untouched.stat().st_mtime_ns == stamp and sam_a.stat().st_mtime_ns == sam_a_stamp
    assert (tmp_path / ATTN_OUT / "bedroom" / "0" / "00003.png").is_file()
    assert len(list((tmp_path / SAM_OUT / "bedroom2" / "0").iterdir())) == 3
    manifest = manifests(tmp_path / SAM_OUT)[-1]
    assert manifest["jobs"] == {"in_shard": 3, "finished_before": 1, "done": 2, "failed": 0}


def test_missing_sam2_checkpoint_is_one_line_before_any_job(tmp_path: Path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    write_meta(bench, {"bedroom": (make_video(bench, "bedroom", 2, 0), ["the bed"])})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(mask_main, [*BASE_ARGS, "--predict_sam_mask", "--vision_pretrained", "ckpts/nope.pt"])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: SAM2 checkpoint not found: ckpts/nope.pt")
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------------------ failures, settings, keypoints
def test_failed_jobs_are_listed_and_the_run_goes_on(tmp_path: Path, monkeypatch, caplog):
    bench = tmp_path / "bench"
    videos = {name: (make_video(bench, name, 5, start=2 * i), [f"exp {name}"])
              for i, name in enumerate(["settings", "corrupt", "changed", "missing", "good"])}
    write_meta(bench, videos)
    write_cache(tmp_path / CACHE_DIR / "settings_0.safetensors", "settings", "0", 5, layer_start=10)
    (tmp_path / CACHE_DIR / "corrupt_0.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    write_cache(tmp_path / CACHE_DIR / "changed_0.safetensors", "changed", "0", 5)
    changed = bench / "davis17/valid/JPEGImages/changed"
    shutil.copyfile(changed / "00004.jpg", changed / "00005.jpg")  # a frame added since stage 1
    write_cache(tmp_path / CACHE_DIR / "good_0.safetensors", "good", "0", 5)
    monkeypatch.chdir(tmp_path)

    status = mask_main([*BASE_ARGS, "--predict_attn_mask"])
    assert status == EXIT_JOBS_FAILED
    (manifest,) = manifests(tmp_path / ATTN_OUT)
    errors = {f["job"]: f["error"] for f in manifest["failures"]}
    assert set(errors) == {"settings/0", "corrupt/0", "changed/0", "missing/0"}
    assert "other settings" in errors["settings/0"] and "layer_start 10" in errors["settings/0"]
    assert "corrupt_0.safetensors" in errors["corrupt/0"]
    assert "changed since stage 1" in errors["changed/0"]
    assert "not found" in errors["missing/0"] and "missing_0.safetensors" in errors["missing/0"]
    assert sorted(p.name for p in (tmp_path / ATTN_OUT).iterdir() if p.is_dir()) == ["good"]
    assert len(list((tmp_path / ATTN_OUT / "good" / "0").iterdir())) == 4
    assert "settings/0 failed" in caplog.text

    # --fail_fast stops at the first failure: the good job at the end is not reached
    status = mask_main([*BASE_ARGS, "--predict_attn_mask", "--fail_fast", "--vis_save_path", "ff"])
    assert status == EXIT_JOBS_FAILED
    (manifest,) = manifests(tmp_path / "ff")
    assert [f["job"] for f in manifest["failures"]] == ["settings/0"] and not (tmp_path / "ff" / "good").exists()


def test_keypoints_script_and_resume(tmp_path: Path, monkeypatch):
    bench = tmp_path / "bench"
    write_meta(bench, {"bedroom": (make_video(bench, "bedroom", 6, 0), ["the bed", "the lamp"])})
    write_cache(tmp_path / CACHE_DIR / "bedroom_0.safetensors", "bedroom", "0", 6)
    write_cache(tmp_path / CACHE_DIR / "bedroom_1.safetensors", "bedroom", "1", 6, seed=3)
    result = run_script("inference_keypoints.py", [*BASE_ARGS, "--use_saved_attn"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for exp in ("0", "1"):
        path = tmp_path / KP_OUT / "bedroom" / exp / "keypoints.pt"
        keypoints = torch.load(path, weights_only=True)
        cache = load_cache(tmp_path / CACHE_DIR / f"bedroom_{exp}.safetensors")
        assert keypoints.dtype == torch.float32 and keypoints.shape == (100, 4)
        assert torch.equal(keypoints, extract_keypoints(fuse_cache(cache), [0, 1, 3, 5]))
        assert set(keypoints[:, 0].tolist()) <= {0.0, 1.0, 3.0, 5.0}
    # an existing file means done
    stamp = (tmp_path / KP_OUT / "bedroom" / "0" / "keypoints.pt").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert keypoint_main(BASE_ARGS) == 0
    assert (tmp_path / KP_OUT / "bedroom" / "0" / "keypoints.pt").stat().st_mtime_ns == stamp
    assert manifests(tmp_path / KP_OUT)[-1]["jobs"]["finished_before"] == 2


def test_ablation_paths_obj_only_cache_and_auto_layer_start(tmp_path: Path, monkeypatch):
    bench = tmp_path / "bench"
    write_meta(bench, {"bedroom": (make_video(bench, "bedroom", 6, 0), ["the bed"])})
    monkeypatch.chdir(tmp_path)
    base = [a for a in BASE_ARGS if a not in ("--attn_layer_idx_start", "14")]
    with pytest.raises(DecafError, match="needs --version"):
        mask_main([*base, "--predict_attn_mask"])

    # 'auto' reads the depth from the checkpoint's config.json (text_config for VLMs): 28 layers → start 14
    ckpt = tmp_path / "ckpts" / "Qwen2.5-VL-7B-Instruct"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "text_config": {"num_hidden_layers": 28}}))
    obj_only_dir = Path("attn_weights") / MODEL / f"{RUN}_obj-only" / "davis_valid"
    write_cache(tmp_path / obj_only_dir / "bedroom_0.safetensors", "bedroom", "0", 6, obj_only=True)

    # an _obj-only cache is valid only with --no_background
    status = mask_main([*base, "--version", str(ckpt), "--predict_attn_mask", "--attn_save_path", str(obj_only_dir)])
    assert status == EXIT_JOBS_FAILED
    (manifest,) = manifests(tmp_path / ATTN_OUT)
    assert "--no_background" in manifest["failures"][0]["error"]

    # with --no_background and --fusion the cache is found in the _obj-only sibling and outputs get suffixes
    status = mask_main([*base, "--version", str(ckpt), "--predict_attn_mask", "--no_background", "--fusion", "frame"])
    assert status == 0
    out = Path("outputs") / MODEL / RUN / f"inf-uniform-F{N}-attn-mask_obj-only_frame-only" / "davis_valid"
    folder = tmp_path / out / "bedroom" / "0"
    cache = load_cache(tmp_path / obj_only_dir / "bedroom_0.safetensors")
    expected = coarse_masks(fuse_cache(cache, no_background=True, fusion="frame"), SIZE)
    assert np.array_equal(np.stack([png(folder / f"{n:05d}.png") for n in (0, 1, 3, 5)]), expected)
    assert manifests(tmp_path / out)[0]["resolved"]["layer_start"] == 14


def test_output_folders_of_both_kinds_never_coincide():
    args = build_mask_parser().parse_args([*BASE_ARGS, "--predict_attn_mask", "--predict_sam_mask",
                                           "--point_threshold", "0.7", "--vis_save_path", "out"])
    settings = resolve_run_settings(args)
    kinds = ["attn-mask", "sam-mask"]
    layout = resolve_layout(args, settings, kinds, args.point_threshold, args.final_score_threshold)
    assert layout.outputs == {"attn-mask": Path("out/attn-mask"),
                              "sam-mask": Path("out/sam-mask_trk-thr-0.80-point-thr-0.70")}
    assert resolve_layout(args, settings, ["sam-mask"]).outputs == {"sam-mask": Path("out")}
    args.vis_save_path = None
    default = resolve_layout(args, settings, kinds, args.point_threshold, args.final_score_threshold).outputs
    assert default["attn-mask"] == ATTN_OUT
    assert default["sam-mask"] == SAM_OUT.parent.parent / f"inf-uniform-F{N}-sam-mask_trk-thr-0.80-point-thr-0.70" / "davis_valid"
