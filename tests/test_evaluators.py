"""The evaluators end to end on small synthetic benchmarks in the reference on-disk formats (SPEC §9.3–§9.4,
§11.4–§11.10). Expected numbers are computed here, directly from the arrays written to disk."""
from __future__ import annotations

import csv
import json
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import copy_frames
from evaluation import eval_rvos, eval_rvos_keypoints, eval_rvos_obj_iou
from evaluation.scoring import point_precision
from model.utils.errors import EXIT_JOBS_FAILED, EXIT_USER_ERROR, run_cli
from test_metrics import boundary_oracle, f_oracle

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64
NUM_FRAMES = 3

# pycocotools' decode predates NumPy 2's __array__ copy keyword; harmless
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---- writing benchmarks ----------------------------------------------------------------------------------------
def small_frames(dest: Path, count: int) -> None:
    """Real bedroom frames shrunk to W×H (keeps the keypoint evaluator's header reads realistic and fast)."""
    for path in copy_frames(dest, count):
        Image.open(path).resize((W, H)).save(path)


def write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)


def encode(mask: np.ndarray, as_str: bool) -> dict:
    out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if as_str:
        out["counts"] = out["counts"].decode("ascii")
    return out


def random_blob(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    cy, cx = rng.uniform(5, H - 5), rng.uniform(5, W - 5)
    ry, rx = rng.uniform(3, 15), rng.uniform(3, 20)
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).astype(np.uint8)


def perturbed(rng: np.random.Generator, gt: np.ndarray | None) -> np.ndarray:
    """A prediction near the GT (shifted), a random blob, or empty."""
    choice = rng.integers(4)
    if gt is not None and choice < 2:
        return np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    return random_blob(rng) if choice < 3 else np.zeros((H, W), np.uint8)


def frame_names(count: int) -> list[str]:
    return [f"{i:05d}" for i in range(count)]


def write_meta(path: Path, videos: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"videos": videos}))


# ---- expected values, straight from the arrays -----------------------------------------------------------------
def j_frame(gt: np.ndarray, pred: np.ndarray) -> float:
    g, p = gt > 0, pred > 0
    union = np.logical_or(g, p).sum()
    return 1.0 if union == 0 else np.logical_and(g, p).sum() / union


def a_frame(gt: np.ndarray, pred: np.ndarray) -> float:
    return float(np.logical_and(gt == 0, pred == 0).sum() / gt.size)  # P is 0/255: only true negatives count


def r_frame(gt: np.ndarray, pred: np.ndarray, fg: np.ndarray) -> float:
    # SPEC §11.3: neg = 255·|P ∧ (G = 0)| + |P ∧ (G = 2)| after the uint8 wrap-around
    neg = 255 * int(np.logical_and(pred > 0, gt == 0).sum()) + int(np.logical_and(pred > 0, gt == 2).sum())
    return max(0.0, 1 - neg / (int(fg.sum()) + 1e-6))


def rounded(j: float, f: float, **extra: float) -> dict:
    out = {"J": round(100 * j, 2), "F": round(100 * f, 2), "JF": round(100 * (j + f) / 2, 2)}
    out.update({k: round(100 * v, 2) for k, v in extra.items()})
    return out


def mean_of(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def outputs_root(tmp: Path, kind: str, data: str) -> Path:
    return tmp / "outputs" / "tiny-rvos" / "F16_L14--1" / f"inf-uniform-F16-{kind}" / data


def metrics_of(pred_root: Path) -> Path:
    parts = list(pred_root.parts)
    parts[len(parts) - 1 - parts[::-1].index("outputs")] = "metrics"
    return Path(*parts)


# ---- DAVIS -----------------------------------------------------------------------------------------------------
DAVIS_VIDEOS = {"bike": 11, "aero": 2}   # 11 expression ids: the string sort "10" < "2" matters


def build_davis(tmp: Path, seed: int = 0, with_expected: bool = True):
    """Ref-DAVIS17 with mask_dict.pkl keyed by the string-sorted running counter (SPEC §10.2)."""
    rng = np.random.default_rng(seed)
    root = tmp / "RVOSJoint"
    meta = {vid: {"expressions": {str(e): {"exp": f"{vid} thing {e}", "obj_id": str(e // 4 + 1)} for e in range(n)},
                  "frames": frame_names(NUM_FRAMES)} for vid, n in DAVIS_VIDEOS.items()}
    write_meta(root / "davis17/meta_expressions/valid/meta_expressions.json", meta)
    gts, mask_dict, counter = {}, {}, 0
    for vid in sorted(meta):
        for exp_id in sorted(meta[vid]["expressions"]):              # str keys: string order
            small_frames(root / "davis17/valid/JPEGImages" / vid, NUM_FRAMES)
            gts[(vid, exp_id)] = [None if (vid, exp_id) == ("aero", "1") or rng.random() < 0.2 else random_blob(rng)
                                  for _ in range(NUM_FRAMES)]
            mask_dict[counter] = [None if m is None else encode(m, as_str=False) for m in gts[(vid, exp_id)]]
            counter += 1
    (root / "davis17/valid/mask_dict.pkl").write_bytes(pickle.dumps(mask_dict))
    pred_root = outputs_root(tmp, "sam-mask", "davis_valid")
    expected = {}
    for (vid, exp_id), frames in gts.items():
        js, fs = [], []
        for name, gt in zip(frame_names(NUM_FRAMES), frames):
            pred = perturbed(rng, gt)
            write_png(pred_root / vid / exp_id / f"{name}.png", pred)
            if with_expected:
                gt = np.zeros((H, W), np.uint8) if gt is None else gt
                js.append(j_frame(gt, pred))
                fs.append(f_oracle(gt, pred))
        if with_expected:
            expected[(vid, exp_id)] = (float(np.mean(js)), float(np.mean(fs)))
    return root, pred_root, meta, gts, expected


def test_dense_davis_end_to_end_subprocess(tmp_path):
    root, pred_root, meta, _, expected = build_davis(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "evaluation/eval_rvos.py"), str(pred_root), "--dataset", "davis",
                           "--data_root", str(root), "--num_workers", "0"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    base = metrics_of(pred_root)
    rows = read_csv(Path(f"{base}.csv"))
    job_order = [(vid, e) for vid in meta for e in meta[vid]["expressions"]]
    assert [(r["video_name"], r["exp_id"]) for r in rows] == job_order          # job-list order
    assert list(rows[0]) == ["video_name", "exp_id", "exp", "videxp", "J", "F", "JF"]
    assert rows[0]["videxp"] == "bike_0" and rows[0]["exp"] == "bike thing 0"
    want = [rounded(*expected[key]) for key in job_order]
    for row, exp in zip(rows, want):
        assert {k: float(row[k]) for k in ("J", "F", "JF")} == exp
    summary = json.loads(Path(f"{base}.json").read_text())
    overall = {"J": mean_of(want, "J"), "F": mean_of(want, "F")}
    overall["JF"] = (overall["J"] + overall["F"]) / 2
    assert summary == {"overall": pytest.approx(overall, abs=1e-9)}
    assert json.loads(Path(f"{base}.failures.json").read_text()) == []
    assert "overall: J" in proc.stdout


def test_unimplemented_davis2017_protocol_is_not_offered(tmp_path, capsys):
    """SPEC §11.11's official-DAVIS option is not implemented, so no flag offers it."""
    root, pred_root, *_ = build_davis(tmp_path, with_expected=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_rvos.main, [str(pred_root), "--dataset", "davis", "--data_root", str(root),
                                 "--protocol", "davis2017"])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "unrecognized arguments: --protocol" in capsys.readouterr().err


def test_spawn_pool_matches_in_process(tmp_path):
    root, pred_root, *_ = build_davis(tmp_path, seed=3, with_expected=False)
    args = [str(pred_root), "--dataset", "davis", "--data_root", str(root)]
    assert eval_rvos.main(args + ["--num_workers", "0"]) == 0
    base = metrics_of(pred_root)
    serial_csv, serial_json = Path(f"{base}.csv").read_text(), Path(f"{base}.json").read_text()
    proc = subprocess.run([sys.executable, str(REPO / "evaluation/eval_rvos.py"), *args, "--num_workers", "2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(f"{base}.csv").read_text() == serial_csv
    assert Path(f"{base}.json").read_text() == serial_json


def test_failures_listed_scored_zero_and_exit_status(tmp_path, capsys):
    root, pred_root, meta, _, expected = build_davis(tmp_path, seed=1)
    (pred_root / "bike/3/00001.png").write_bytes(b"\x89PNG garbage")                       # corrupt PNG
    write_png(pred_root / "bike/4/00002.png", np.ones((H + 2, W), np.uint8))                 # wrong size
    for png in (pred_root / "bike/7").iterdir():                                             # missing exp folder
        png.unlink()
    (pred_root / "bike/7").rmdir()
    for folder in (pred_root / "aero").iterdir():                                            # missing video folder
        for png in folder.iterdir():
            png.unlink()
        folder.rmdir()
    (pred_root / "aero").rmdir()
    args = [str(pred_root), "--dataset", "davis", "--data_root", str(root), "--num_workers", "0"]
    assert eval_rvos.main(args) == EXIT_JOBS_FAILED
    err = capsys.readouterr().err
    base = metrics_of(pred_root)
    failures = json.loads(Path(f"{base}.failures.json").read_text())
    reasons = {(f["video_name"], f["exp_id"]): f["reason"] for f in failures}
    assert set(reasons) == {("bike", "3"), ("bike", "4"), ("bike", "7"), ("aero", "0"), ("aero", "1")}
    assert "unreadable prediction" in reasons[("bike", "3")] and "00001.png" in reasons[("bike", "3")]
    assert f"is {W}x{H + 2}, expected {W}x{H}" in reasons[("bike", "4")]
    assert "missing expression folder" in reasons[("bike", "7")]
    assert "missing video folder" in reasons[("aero", "0")]
    assert err.count("failed: ") == 5
    rows = {(r["video_name"], r["exp_id"]): r for r in read_csv(Path(f"{base}.csv"))}
    assert all(float(rows[k]["J"]) == float(rows[k]["F"]) == float(rows[k]["JF"]) == 0 for k in reasons)
    kept = [rounded(*expected[k]) for k in rows if k not in reasons]
    summary = json.loads(Path(f"{base}.json").read_text())
    assert summary["overall"]["J"] == pytest.approx(sum(r["J"] for r in kept) / len(rows), abs=1e-9)
    assert eval_rvos.main(args + ["--allow_missing"]) == 0


@pytest.mark.parametrize("breakage, pattern", [
    ("no_meta", r"meta file not found: .*meta_expressions\.json"),
    ("bad_json", r"meta_expressions\.json is not valid JSON"),
    ("no_mask", r"mask file not found: .*mask_dict\.pkl"),
    ("no_pred", r"prediction folder not found: .*davis_valid"),
    ("testset", r"--testset"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, breakage, pattern):
    root, pred_root, *_ = build_davis(tmp_path, with_expected=False)
    meta = root / "davis17/meta_expressions/valid/meta_expressions.json"
    extra = []
    if breakage == "no_meta":
        meta.unlink()
    elif breakage == "bad_json":
        meta.write_text("{oops")
    elif breakage == "no_mask":
        (root / "davis17/valid/mask_dict.pkl").unlink()
    elif breakage == "no_pred":
        pred_root = pred_root.with_name("davis_valid_missing")
    else:
        extra = ["--testset"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_rvos.main, [str(pred_root), "--dataset", "davis", "--data_root", str(root), *extra])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(pattern, err[0]), err[0]


# ---- ReVOS (nested keys, overlaps, A/R, type split) ------------------------------------------------------------
def build_revos(tmp: Path, seed: int = 5):
    rng = np.random.default_rng(seed)
    root = tmp / "RVOSJoint"
    layout = {  # video key → (num frames, {exp_id: (type_id, anno_ids)})
        "MOSE/abc": (3, {"0": (0, [1, 2]), "1": (1, [3]), "2": (2, [])}),
        "TAO/x/y": (2, {"0": (0, [4]), "3": (1, [5, 4]), "1": (0, [5])}),
    }
    objects = {1: "MOSE/abc", 2: "MOSE/abc", 3: "MOSE/abc", 4: "TAO/x/y", 5: "TAO/x/y"}
    masks = {}
    for anno, vid in objects.items():
        masks[anno] = [None if rng.random() < 0.2 else random_blob(rng) for _ in range(layout[vid][0])]
    masks[2][0] = np.roll(masks[1][0], 2, axis=1) if masks[1][0] is not None else random_blob(rng)  # overlap → 2
    mask_json = {str(a): [None if m is None else encode(m, as_str=True) for m in ms] for a, ms in masks.items()}
    (root / "ReVOS").mkdir(parents=True)
    (root / "ReVOS/mask_dict.json").write_text(json.dumps(mask_json))
    foreground = {}
    for vid, (count, _) in layout.items():
        fg = [np.zeros((H, W), np.uint8) for _ in range(count)]
        for anno in (a for a, v in objects.items() if v == vid):
            for f, m in enumerate(masks[anno]):
                if m is not None:
                    fg[f] |= m
        foreground[vid] = {"masks_rle": [encode(m, as_str=True) for m in fg],
                           "foreground_ratio": [float(m.mean()) for m in fg]}
    (root / "ReVOS/mask_dict_foreground.json").write_text(json.dumps(foreground))
    meta = {vid: {"vid_id": i + 7, "height": H, "width": W, "frames": frame_names(count),
                  "expressions": {e: {"exp": f"{vid} {e}", "obj_id": anno, "anno_id": anno, "type_id": t}
                                  for e, (t, anno) in exps.items()}}
            for i, (vid, (count, exps)) in enumerate(layout.items())}
    write_meta(root / "ReVOS/meta_expressions_valid_.json", meta)
    pred_root = outputs_root(tmp, "sam-mask", "revos_valid")
    expected, fg_arrays = {}, {}
    for vid, (count, exps) in layout.items():
        fg_arrays[vid] = [mask_utils.decode(r) for r in foreground[vid]["masks_rle"]]
        for exp_id, (type_id, annos) in exps.items():
            per = {"J": [], "F": [], "A": [], "R": []}
            for f, name in enumerate(frame_names(count)):
                gt = np.zeros((H, W), np.uint8)
                for a in annos:
                    if masks[a][f] is not None:
                        gt = gt + masks[a][f]
                if (vid, exp_id) == ("MOSE/abc", "0") and f == 0:
                    assert gt.max() == 2
                    pred = (gt > 0).astype(np.uint8)   # predicts the overlap too
                else:
                    pred = perturbed(rng, gt if gt.any() else None)
                write_png(pred_root / vid / exp_id / f"{name}.png", pred)
                pred255 = pred * 255
                per["J"].append(j_frame(gt, pred255))
                per["F"].append(f_oracle(gt > 0, pred255 > 0))
                per["A"].append(a_frame(gt, pred255))
                per["R"].append(r_frame(gt, pred255, fg_arrays[vid][f]))
            expected[(vid, exp_id)] = ({k: float(np.mean(v)) for k, v in per.items()}, type_id)
    return root, pred_root, meta, expected


def revos_summary(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for name, type_id in (("referring", 0), ("reason", 1)):
        sub = [r for r, t in rows if t == type_id]
        out[name] = {k: mean_of(sub, k) for k in keys}
        out[name]["JF"] = (out[name]["J"] + out[name]["F"]) / 2
    out["overall"] = {k: (out["referring"][k] + out["reason"][k]) / 2 for k in out["referring"]}
    return out


def test_dense_revos_nested_keys_a_r_and_type_split(tmp_path):
    root, pred_root, meta, expected = build_revos(tmp_path)
    assert eval_rvos.main([str(pred_root), "--dataset", "revos", "--data_root", str(root),
                           "--num_workers", "1"]) == 0
    base = metrics_of(pred_root)
    rows = read_csv(Path(f"{base}.csv"))
    assert list(rows[0]) == ["video_name", "exp_id", "exp", "videxp", "J", "F", "JF", "A", "R", "type_id"]
    assert [(r["video_name"], r["exp_id"]) for r in rows] == [(v, e) for v in meta for e in meta[v]["expressions"]]
    assert rows[3]["videxp"].rsplit("_", 1) == ["TAO/x/y", "0"]
    want = []
    for row in rows:
        raw, type_id = expected[(row["video_name"], row["exp_id"])]
        exp = rounded(raw["J"], raw["F"], A=raw["A"], R=raw["R"])
        assert {k: float(row[k]) for k in exp} == exp and int(row["type_id"]) == type_id
        want.append((exp, type_id))
    summary = json.loads(Path(f"{base}.json").read_text())
    assert list(summary) == ["referring", "reason", "overall"]
    assert list(summary["overall"]) == ["J", "F", "A", "R", "JF"]
    reference = revos_summary(want, ("J", "F", "A", "R"))
    for group in reference:
        assert summary[group] == pytest.approx(reference[group], abs=1e-9)


def test_dense_revos_missing_foreground_entry_is_a_failure(tmp_path):
    root, pred_root, *_ = build_revos(tmp_path)
    fg_path = root / "ReVOS/mask_dict_foreground.json"
    fg = json.loads(fg_path.read_text())
    del fg["TAO/x/y"]
    fg_path.write_text(json.dumps(fg))
    assert eval_rvos.main([str(pred_root), "--dataset", "revos", "--data_root", str(root), "--num_workers", "0",
                           "--allow_missing"]) == 0
    failures = json.loads(Path(f"{metrics_of(pred_root)}.failures.json").read_text())
    assert {f["video_name"] for f in failures} == {"TAO/x/y"} and len(failures) == 3
    assert "no 'masks_rle' for video TAO/x/y" in failures[0]["reason"]


# ---- coarse evaluator (§11.6) ----------------------------------------------------------------------------------
def test_coarse_revos_only_frames_with_png_subprocess(tmp_path):
    root, dense_root, meta, _ = build_revos(tmp_path, seed=9)
    pred_root = outputs_root(tmp_path, "attn-mask", "revos_valid")
    masks = json.loads((root / "ReVOS/mask_dict.json").read_text())
    want = []
    for vid, entry in meta.items():
        for exp_id, exp in entry["expressions"].items():
            js, fs = [], []
            for f, name in enumerate(entry["frames"]):
                if f == 1:
                    continue   # "not sampled": no PNG
                src = dense_root / vid / exp_id / f"{name}.png"
                dst = pred_root / vid / exp_id / f"{name}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
                pred = np.array(Image.open(dst))
                gt = np.zeros((H, W), np.uint8)
                for a in exp["anno_id"]:
                    if masks[str(a)][f] is not None:
                        gt += mask_utils.decode(masks[str(a)][f])
                js.append(j_frame(gt, pred))
                fs.append(f_oracle(gt > 0, pred > 0))
            want.append((rounded(float(np.mean(js)), float(np.mean(fs))), exp["type_id"]))
    (root / "ReVOS/mask_dict_foreground.json").unlink()   # the coarse evaluator has no A/R: not needed
    proc = subprocess.run([sys.executable, str(REPO / "evaluation/eval_rvos_obj_iou.py"), str(pred_root),
                           "--dataset", "revos", "--data_root", str(root), "--num_workers", "0"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    base = metrics_of(pred_root)
    rows = read_csv(Path(f"{base}.csv"))
    assert list(rows[0]) == ["video_name", "exp_id", "exp", "videxp", "J", "F", "JF", "type_id"]
    for row, (exp, _) in zip(rows, want):
        assert {k: float(row[k]) for k in exp} == exp
    summary = json.loads(Path(f"{base}.json").read_text())
    reference = revos_summary(want, ("J", "F"))
    assert list(summary["overall"]) == ["J", "F", "JF"]
    for group in reference:
        assert summary[group] == pytest.approx(reference[group], abs=1e-9)


def test_coarse_mevis_stray_png_and_missing_video(tmp_path):
    rng = np.random.default_rng(11)
    root = tmp_path / "RVOSJoint"
    meta = {vid: {"vid_id": vid, "frames": frame_names(4),
                  "expressions": {"0": {"exp": "a", "obj_id": [0, 1], "anno_id": [f"{vid}1", f"{vid}2"]},
                                  "1": {"exp": "b", "obj_id": [1], "anno_id": [f"{vid}2"]}}}
            for vid in ("m1", "m2")}
    write_meta(root / "mevis/valid_u/meta_expressions.json", meta)
    gts = {f"{vid}{k}": [random_blob(rng) for _ in range(4)] for vid in meta for k in (1, 2)}
    (root / "mevis/valid_u/mask_dict.json").write_text(json.dumps(
        {k: [encode(m, as_str=True) for m in v] for k, v in gts.items()}))
    pred_root = outputs_root(tmp_path, "attn-mask", "mevis_valid_u")
    expected = {}
    for exp_id, annos in (("0", ["m11", "m12"]), ("1", ["m12"])):
        js, fs = [], []
        for f in (0, 2):
            gt = sum(gts[a][f] for a in annos).astype(np.uint8)
            pred = perturbed(rng, gt)
            write_png(pred_root / "m1" / exp_id / f"{f:05d}.png", pred)
            js.append(j_frame(gt, pred))
            fs.append(f_oracle(gt > 0, pred > 0))
        expected[("m1", exp_id)] = rounded(float(np.mean(js)), float(np.mean(fs)))
    write_png(pred_root / "m1/1/99999.png", np.ones((H, W), np.uint8))   # not a meta frame: reported, ignored
    args = [str(pred_root), "--dataset", "mevis", "--data_root", str(root), "--num_workers", "0"]
    assert eval_rvos_obj_iou.main(args) == EXIT_JOBS_FAILED
    base = metrics_of(pred_root)
    rows = {(r["video_name"], r["exp_id"]): r for r in read_csv(Path(f"{base}.csv"))}
    for key, exp in expected.items():
        assert {k: float(rows[key][k]) for k in exp} == exp
    assert float(rows[("m2", "0")]["J"]) == 0 and float(rows[("m2", "1")]["F"]) == 0
    failures = json.loads(Path(f"{base}.failures.json").read_text())
    reasons = {(f["video_name"], f["exp_id"]): f["reason"] for f in failures}
    assert set(reasons) == {("m1", "1"), ("m2", "0"), ("m2", "1")}
    assert "99999.png" in reasons[("m1", "1")] and "missing video folder" in reasons[("m2", "0")]
    summary = json.loads(Path(f"{base}.json").read_text())
    assert summary["overall"]["J"] == pytest.approx(sum(e["J"] for e in expected.values()) / 4, abs=1e-9)
    assert eval_rvos_obj_iou.main(args + ["--allow_missing"]) == 0


# ---- keypoints (§9.3–§9.4) -------------------------------------------------------------------------------------
def test_point_precision_half_open_window():
    o = 3
    gt = np.zeros((H, W), np.uint8)
    py, px = 20, 30
    point = np.array([[0, (py + 0.5) / H, (px + 0.5) / W, 1.0]], np.float32)
    gt[py + o, px] = 1                                    # just outside: rows [py−o, py+o) exclude py+o
    assert point_precision(point, {0: gt}, (H, W), o)["PP@1"] == 0
    gt[py - o, px + o - 1] = 1                            # the first row and last column of the window
    assert point_precision(point, {0: gt}, (H, W), o)["PP@1"] == 1
    last = np.zeros((H, W), np.uint8)
    last[H - 1, :] = 1                                    # the last image row can never be inside the window
    corner = np.array([[0, 0.999, 0.5, 1.0]], np.float32)
    assert point_precision(corner, {0: last}, (H, W), o)["PP@1"] == 0
    assert point_precision(corner, {0: last}, (H, W), o)["PP@5"] == 0


def build_keypoints(tmp: Path):
    root, _, meta, gts, _ = build_davis(tmp, seed=21, with_expected=False)
    rng = np.random.default_rng(4)
    pred_root = outputs_root(tmp, "keypoint", "davis_valid")
    o = 4
    expected = {}
    for (vid, exp_id), frames in gts.items():
        count = 100 if exp_id != "2" else 30             # fewer than 100 points: PP@K still divides by K
        points = np.stack([rng.integers(0, NUM_FRAMES, count), rng.random(count), rng.random(count),
                           rng.integers(0, 8, count) / 8], axis=1).astype(np.float32)   # tied scores
        out = pred_root / vid / exp_id / "keypoints.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(points), out)
        order = sorted(range(count), key=lambda i: -float(points[i, 3]))   # Python's sort is stable
        hits = []
        for i in order:
            t, gt = int(points[i, 0]), frames[int(points[i, 0])]
            py = min(int(np.float32(points[i, 1]) * np.float32(H)), H - 1)
            px = min(int(np.float32(points[i, 2]) * np.float32(W)), W - 1)
            hits.append(gt is not None and any(gt[r, c] for r in range(max(py - o, 0), min(py + o, H - 1))
                                               for c in range(max(px - o, 0), min(px + o, W - 1))))
        expected[(vid, exp_id)] = {f"PP@{k}": round(100 * sum(hits[:k]) / k, 2) for k in (1, 5, 10, 50, 100)}
    return root, pred_root, meta, expected, o


def test_keypoints_end_to_end_subprocess(tmp_path):
    root, pred_root, meta, expected, o = build_keypoints(tmp_path)
    small_frames(tmp_path / "extra", 1)                   # aero gets a 4th JPEG: excluded (SPEC §9.4)
    (tmp_path / "extra/00000.jpg").rename(root / "davis17/valid/JPEGImages/aero/00003.jpg")
    torch.save(torch.tensor([[NUM_FRAMES, 0.5, 0.5, 1.0]]), pred_root / "bike/5/keypoints.pt")  # frame out of range
    (pred_root / "bike/6/keypoints.pt").unlink()          # missing
    proc = subprocess.run([sys.executable, str(REPO / "evaluation/eval_rvos_keypoints.py"), str(pred_root),
                           "--dataset", "davis", "--data_root", str(root), "--offset", str(o),
                           "--num_workers", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == EXIT_JOBS_FAILED, proc.stderr
    base = Path(f"{metrics_of(pred_root)}_offset-{o}")
    rows = read_csv(Path(f"{base}.csv"))
    keys = ["PP@1", "PP@5", "PP@10", "PP@50", "PP@100"]
    assert list(rows[0]) == ["video_name", "exp_id", "exp", "videxp", *keys]
    included = []
    for row in rows:
        key = (row["video_name"], row["exp_id"])
        if key[0] == "aero":
            assert all(row[k] == "" for k in keys)
            continue
        want = {k: 0.0 for k in keys} if key[1] in ("5", "6") else expected[key]
        assert {k: float(row[k]) for k in keys} == want
        included.append(want)
    assert len(included) == 11 and any(0 < v["PP@100"] < 100 for v in included)
    summary = json.loads(Path(f"{base}.json").read_text())
    assert summary == {"overall": pytest.approx({k: mean_of(included, k) for k in keys}, abs=1e-9)}
    failures = json.loads(Path(f"{base}.failures.json").read_text())
    assert {(f["exp_id"], "outside the 3 meta frames" in f["reason"] or "missing keypoints" in f["reason"])
            for f in failures} == {("5", True), ("6", True)}


def test_keypoints_corrupt_file_is_a_failure(tmp_path):
    root, pred_root, _, _, o = build_keypoints(tmp_path)
    (pred_root / "aero/0/keypoints.pt").write_bytes(b"junk")
    torch.save(torch.zeros(3, 2), pred_root / "aero/1/keypoints.pt")
    args = [str(pred_root), "--dataset", "davis", "--data_root", str(root), "--offset", str(o), "--num_workers", "0"]
    assert eval_rvos_keypoints.main(args + ["--allow_missing"]) == 0
    failures = json.loads(Path(f"{metrics_of(pred_root)}_offset-{o}.failures.json").read_text())
    reasons = {f["exp_id"]: f["reason"] for f in failures}
    assert "unreadable keypoints" in reasons["0"] and "float (K, 4)" in reasons["1"]


# ---- server zip (§11.10) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, prefix", [("ytvos", "Annotations/"), ("mevis", "")])
def test_zip_layouts_subprocess(tmp_path, dataset, prefix):
    pred = tmp_path / "pred"
    mask = np.zeros((H, W), np.uint8)
    for vid, exp_id, frame in (("v1", "0", "00000"), ("v1", "0", "00001"), ("v2", "3", "00000")):
        write_png(pred / vid / exp_id / f"{frame}.png", mask)
    (pred / "v3/0").mkdir(parents=True)                   # empty folders vanish
    (pred / "manifest_1.json").write_text("{}")           # not a prediction
    out = tmp_path / "sub.zip"
    proc = subprocess.run([sys.executable, str(REPO / "evaluation/zip_refvos_results.py"), str(pred), str(out),
                           "--dataset", dataset], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == [f"{prefix}v1/0/00000.png", f"{prefix}v1/0/00001.png",
                                              f"{prefix}v2/3/00000.png"]
    assert "2 videos, 2 expressions, 3 PNGs" in proc.stdout


def test_zip_rejects_other_datasets(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evaluation/zip_refvos_results.py"), str(tmp_path),
                           str(tmp_path / "x.zip"), "--dataset", "davis"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not (tmp_path / "x.zip").exists()


def test_boundary_oracle_is_used_at_frame_size():
    # guard for the expected-value helper itself: the oracle sees W×H frames, radius 1
    assert boundary_oracle(np.ones((H, W), np.uint8)).sum() == 0
