"""The ReasonVOS reformat of SPEC §10.4 on a synthetic tree in VideoLISA's layout, then the dense evaluator on
its output."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import copy_frames
from evaluation import eval_rvos
from evaluation.reasonvos_reformat import reformat, reformat_meta
from model.utils.errors import DecafError

REPO = Path(__file__).resolve().parents[1]
H, W = 12, 16

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def exp(exp_id: int, obj_id: int, text: str) -> dict:
    return {"exp_id": exp_id, "obj_id": obj_id, "exp_text": text, "is_sent": exp_id % 2 == 0}


ORIGINAL = {
    "b": {"source": "BURST", "frames": ["00000", "00001"],
          "expressions": [exp(0, 1, "A"), exp(1, 1, "B"), exp(0, 2, "C"), exp(1, 2, "D"), exp(0, 3, "E")]},
    "a": {"source": "MeViS", "frames": ["00000", "00001", "00002"], "expressions": [exp(4, 7, "F")]},
}


def object_masks(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((H, W)) < 0.3).astype(np.uint8) for _ in range(count)]


def build_reasonvos(tmp: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    root = tmp / "RVOSJoint"
    base = root / "ReasonVOS"
    base.mkdir(parents=True)
    (base / "meta_expressions.json").write_text(json.dumps({"videos": ORIGINAL}))
    masks = {}
    for seed, (vid, video) in enumerate(ORIGINAL.items()):
        copy_frames(base / "JPEGImages" / vid, len(video["frames"]))
        for obj in sorted({e["obj_id"] for e in video["expressions"]}):
            anno = f"{video['source']}_{vid}_{obj}"
            count = 2 if vid == "a" else len(video["frames"])     # "a": one mask file short (a count mismatch)
            masks[anno] = object_masks(seed * 10 + obj, count)
            folder = base / "Annotations" / anno
            folder.mkdir(parents=True)
            for k, m in enumerate(masks[anno]):
                # different file names and PNG modes: alignment is by position, foreground is any value > 0
                image = Image.fromarray(m * (k + 1))
                if obj == 2:
                    image = image.convert("P")
                image.save(folder / f"mask_{k:03d}.png")
    return root, masks


def test_reformat_meta_hand_traced_duplicates():
    new = reformat_meta(ORIGINAL)
    assert list(new) == ["a", "b"]                              # sorted videos
    d = new["b"]["expressions"]
    # hand trace of SPEC §10.4: a later duplicate keeps the id (moved to the end); the earlier one takes max + 1
    assert list(d) == ["2", "1", "3", "0", "4"]
    assert {k: v["exp"] for k, v in d.items()} == {"2": "A", "1": "D", "3": "B", "0": "E", "4": "C"}
    assert d["4"] == {"exp": "C", "obj_id": [2], "anno_id": ["BURST_b_2"], "is_sent": True}
    assert new["a"] == {"source": "MeViS", "frames": ["00000", "00001", "00002"],
                        "expressions": {"4": {"exp": "F", "obj_id": [7], "anno_id": ["MeViS_a_7"], "is_sent": True}}}
    assert all("vid_id" not in v and "type_id" not in e for v in new.values() for e in v["expressions"].values())


def test_reformat_subprocess_then_evaluate(tmp_path, capsys):
    root, masks = build_reasonvos(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "data_reformat_reasonvos.py"), "--data_root", str(root)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "expressions: original 6, new 6" in proc.stdout
    assert "count mismatch: video a: 3 JPEGs, 3 meta frames, mask files MeViS_a_7: 2" in proc.stdout
    assert "video b" not in proc.stdout
    meta = json.loads((root / "ReasonVOS/meta_expressions_v2.json").read_text())["videos"]
    assert meta == json.loads(json.dumps(reformat_meta(ORIGINAL)))
    assert list(meta["b"]["expressions"]) == ["2", "1", "3", "0", "4"]
    mask_dict = pickle.loads((root / "ReasonVOS/mask_dict_v2.pkl").read_bytes())
    assert list(mask_dict) == sorted(masks)
    for anno, arrays in masks.items():
        assert len(mask_dict[anno]) == len(arrays)
        for rle, m in zip(mask_dict[anno], arrays):
            assert isinstance(rle["counts"], bytes) and rle["size"] == [H, W]
            np.testing.assert_array_equal(mask_utils.decode(rle), m)

    # predictions equal to the GT: every expression of "b" scores 100; "a" lacks a GT entry for frame 2
    pred_root = tmp_path / "outputs/m/F16_L14--1/inf-uniform-F16-sam-mask/reasonvos_valid"
    for vid, video in meta.items():
        for exp_id, entry in video["expressions"].items():
            arrays = masks[entry["anno_id"][0]]
            for k, name in enumerate(video["frames"]):
                out = pred_root / vid / exp_id / f"{name}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arrays[min(k, len(arrays) - 1)] * 255).save(out)
    args = [str(pred_root), "--dataset", "reasonvos", "--data_root", str(root), "--num_workers", "0"]
    assert eval_rvos.main(args + ["--allow_missing"]) == 0
    metrics = tmp_path / "metrics/m/F16_L14--1/inf-uniform-F16-sam-mask/reasonvos_valid"
    failures = json.loads(Path(f"{metrics}.failures.json").read_text())
    assert failures == [{"video_name": "a", "exp_id": "4",
                         "reason": "anno_id 'MeViS_a_7' has 2 GT entries for 3 meta frames"}]
    summary = json.loads(Path(f"{metrics}.json").read_text())
    assert summary == {"overall": {"J": 500 / 6, "F": 500 / 6, "JF": 500 / 6}}


def test_reformat_rejects_multichannel_png(tmp_path):
    root, _ = build_reasonvos(tmp_path)
    bad = root / "ReasonVOS/Annotations/BURST_b_3/mask_001.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(bad)
    with pytest.raises(DecafError, match=r"mask .*BURST_b_3/mask_001\.png has 3 channels"):
        reformat(root)
    assert not (root / "ReasonVOS/meta_expressions_v2.json").exists()


def test_reformat_bad_input(tmp_path):
    root, _ = build_reasonvos(tmp_path)
    meta = root / "ReasonVOS/meta_expressions.json"
    videos = json.loads(meta.read_text())["videos"]
    videos["b"]["expressions"][0].pop("exp_text")
    meta.write_text(json.dumps({"videos": videos}))
    with pytest.raises(DecafError, match=r"meta_expressions\.json: an expression of video 'b' lacks exp_text"):
        reformat(root)
    meta.unlink()
    proc = subprocess.run([sys.executable, str(REPO / "data_reformat_reasonvos.py"), "--data_root", str(root)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: meta file not found:") and len(proc.stderr.strip().splitlines()) == 1
