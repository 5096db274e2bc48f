"""Dataset roots, meta loading, job lists, sharding, DAVIS anno ids and GT assembly (SPEC §10)."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import copy_frames
from evaluation.ground_truth import davis_anno_ids, expression_anno_ids, gt_masks, load_mask_dict
from model.jobs.benchmarks import (DATASETS, DatasetFiles, Job, dataset_files, default_data_root, group_by_video,
                                   list_jobs, load_meta, shard_from_env, shard_jobs)
from model.utils.errors import DecafError


def write_meta(path: Path, videos: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"videos": videos}))


def video_entry(num_frames: int, exp_ids, **extra) -> dict:
    return {"frames": [f"{i:05d}" for i in range(num_frames)],
            "expressions": {str(e): {"exp": f"object {e}"} for e in exp_ids}, **extra}


def rle(mask: np.ndarray, as_str: bool = True) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if as_str:
        encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A tree with every benchmark: 2 frames per video (real bedroom JPEGs), frames are never decoded here."""
    root = tmp_path / "RVOSJoint"
    davis = {"bike": video_entry(2, range(12)), "aero": video_entry(2, [0, 1])}
    write_meta(root / "davis17/meta_expressions/valid/meta_expressions.json", davis)
    for vid in davis:
        copy_frames(root / "davis17/valid/JPEGImages" / vid, 2)
    revos = {"MOSE/abc": video_entry(2, [0, 1], vid_id=17), "TAO/x/y": video_entry(2, [0], vid_id=3),
             "UVO/gone": video_entry(2, [5], vid_id=4)}   # no frame folder: skipped with a warning
    write_meta(root / "ReVOS/meta_expressions_valid_.json", revos)
    for key in ("MOSE/abc", "TAO/x/y"):
        copy_frames(root / "ReVOS/JPEGImages" / key, 2)
    write_meta(root / "ReasonVOS/meta_expressions_v2.json", {"v1": video_entry(2, [0, 1, 2])})
    copy_frames(root / "ReasonVOS/JPEGImages/v1", 2)
    for split, vids in (("valid_u", ["m1"]), ("valid", ["m2", "m3"])):
        write_meta(root / f"mevis/{split}/meta_expressions.json", {v: video_entry(2, [0]) for v in vids})
        for vid in vids:
            copy_frames(root / f"mevis/{split}/JPEGImages" / vid, 2)
    yt = {f"y{i}": video_entry(2, [0, 1]) for i in range(4)}
    write_meta(root / "ref-youtube-vos/meta_expressions/valid/meta_expressions.json", yt)
    write_meta(root / "ref-youtube-vos/meta_expressions/test/meta_expressions.json",
               {"y1": video_entry(2, [0]), "y3": video_entry(2, [0])})
    for vid in yt:
        copy_frames(root / "ref-youtube-vos/valid/JPEGImages" / vid, 2)
    return root

# ---- roots and files (§10.1) -----------------------------------------------------------------------------------
def test_dataset_files_layout(tmp_path):
    root = tmp_path
    assert dataset_files("davis", root) == DatasetFiles(
        root / "davis17/meta_expressions/valid/meta_expressions.json", root / "davis17/valid/JPEGImages",
        root / "davis17/valid/mask_dict.pkl", None)
    revos = dataset_files("revos", root)
    assert revos.meta == root / "ReVOS/meta_expressions_valid_.json"
    assert revos.foreground == root / "ReVOS/mask_dict_foreground.json"
    assert dataset_files("reasonvos", root).mask == root / "ReasonVOS/mask_dict_v2.pkl"
    assert dataset_files("mevis", root).mask == root / "mevis/valid_u/mask_dict.json"
    test = dataset_files("mevis", root, testset=True)
    assert test.meta == root / "mevis/valid/meta_expressions.json" and test.mask is None
    assert test.frames_root == root / "mevis/valid/JPEGImages"
    assert dataset_files("ytvos", root).mask is None
    assert set(DATASETS) == {"davis", "revos", "reasonvos", "mevis", "ytvos"}
    with pytest.raises(DecafError, match="unknown --dataset"):
        dataset_files("refcoco", root)
    with pytest.raises(DecafError, match="^testset selects"):
        dataset_files("davis", root, testset=True)


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("DECAF_DATA_ROOT", raising=False)
    assert default_data_root() == Path("datasets/RVOSJoint")
    assert dataset_files("davis").meta == Path("datasets/RVOSJoint/davis17/meta_expressions/valid/"
                                                "meta_expressions.json")
    monkeypatch.setenv("DECAF_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path


# ---- meta and mask files ---------------------------------------------------------------------------------------
def test_load_meta_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DecafError, match="nope.json"):
        load_meta(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"videos": {')
    with pytest.raises(DecafError, match=r"bad\.json is not valid JSON"):
        load_meta(bad)
    novideos = tmp_path / "novideos.json"
    novideos.write_text('{"vids": {}}')
    with pytest.raises(DecafError, match=r"novideos\.json has no 'videos' key"):
        load_meta(novideos)
    good = tmp_path / "good.json"
    write_meta(good, {"b": video_entry(1, [0]), "a": video_entry(1, [0])})
    assert list(load_meta(good)) == ["b", "a"]   # meta order kept


def test_load_mask_dict_json_and_pickle(tmp_path):
    m = np.zeros((4, 5), np.uint8)
    m[1, 2] = 1
    (tmp_path / "d.json").write_text(json.dumps({"3": [rle(m), None]}))
    (tmp_path / "d.pkl").write_bytes(pickle.dumps({3: [rle(m, as_str=False), None]}))
    from_json = load_mask_dict(tmp_path / "d.json")
    from_pkl = load_mask_dict(tmp_path / "d.pkl")
    np.testing.assert_array_equal(gt_masks([3], from_json, 2), gt_masks(["3"], from_pkl, 2))
    (tmp_path / "corrupt.pkl").write_bytes(b"not a pickle")
    for name, pattern in (("corrupt.pkl", "corrupt.pkl is not a readable pickle"), ("missing.pkl", "missing.pkl"),
                          ("missing.json", "missing.json"), ("d.txt", "unsupported suffix")):
        with pytest.raises(DecafError, match=pattern):
            load_mask_dict(tmp_path / name)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DecafError, match="must hold a dict"):
        load_mask_dict(tmp_path / "list.json")


# ---- job lists (§10.9) -----------------------------------------------------------------------------------------
def test_list_jobs_order_names_and_missing_frames(data_root, caplog):
    jobs = list_jobs("davis", data_root)
    assert [j.video_key for j in jobs[:12]] == ["bike"] * 12
    assert [j.exp_id for j in jobs[:3]] == ["0", "1", "2"]          # meta order, not sorted
    assert jobs[-1].job_id == "aero/1" and jobs[-1].vid_name == "aero"
    assert jobs[0] == Job("davis", "bike", "bike", "0", "object 0", data_root / "davis17/valid/JPEGImages/bike")
    with caplog.at_level(logging.WARNING):
        revos = list_jobs("revos", data_root, check_frames=True)
    assert [(j.video_key, j.vid_name, j.exp_id) for j in revos] == [("MOSE/abc", "17", "0"), ("MOSE/abc", "17", "1"),
                                                                   ("TAO/x/y", "3", "0")]
    assert revos[0].frames_dir == data_root / "ReVOS/JPEGImages/MOSE/abc"
    assert any("UVO/gone" in r.message for r in caplog.records)
    assert [j.video_key for j in list_jobs("mevis", data_root)] == ["m1"]
    assert [j.video_key for j in list_jobs("mevis", data_root, testset=True)] == ["m2", "m3"]
    assert len(list_jobs("reasonvos", data_root, check_frames=True)) == 3


def test_ytvos_drops_test_videos_and_warns(data_root, caplog):
    with caplog.at_level(logging.WARNING):
        jobs = list_jobs("ytvos", data_root)
    assert sorted({j.video_key for j in jobs}) == ["y0", "y2"]
    assert any("2 videos remain, expected 202" in r.message for r in caplog.records)
    (data_root / "ref-youtube-vos/meta_expressions/test/meta_expressions.json").unlink()
    assert len({j.video_key for j in list_jobs("ytvos", data_root)}) == 4


def test_check_frames_mismatch_names_the_video(data_root, caplog):
    folder = data_root / "davis17/valid/JPEGImages/aero"
    (folder / "notes.txt").write_text("stray")          # ignored with a warning (SPEC §2.2)
    with caplog.at_level(logging.WARNING):
        list_jobs("davis", data_root, check_frames=True)
    assert any("non-frame" in r.message for r in caplog.records)
    (folder / "00001.jpg").rename(folder / "00007.jpg")
    with pytest.raises(DecafError, match=r"video aero: .*position 1: meta '00001' vs folder '00007'"):
        list_jobs("davis", data_root, check_frames=True)
    assert len(list_jobs("davis", data_root)) == 14     # without the check the names are not compared
    (folder / "00007.jpg").unlink()
    with pytest.raises(DecafError, match="meta lists 2 frames but .* holds 1"):
        list_jobs("davis", data_root, check_frames=True)


def test_list_jobs_bad_meta(data_root):
    meta = data_root / "ReasonVOS/meta_expressions_v2.json"
    meta.write_text(json.dumps({"videos": {"v1": {"frames": ["00000"]}}}))
    with pytest.raises(DecafError, match=r"meta_expressions_v2\.json: video 'v1' has no 'expressions'"):
        list_jobs("reasonvos", data_root)
    (data_root / "mevis/valid_u/meta_expressions.json").unlink()
    with pytest.raises(DecafError, match="meta file not found: .*valid_u/meta_expressions.json"):
        list_jobs("mevis", data_root)


# ---- sharding (§10.9) ------------------------------------------------------------------------------------------
def _jobs(n: int) -> list[Job]:
    return [Job("davis", f"v{i // 3}", f"v{i // 3}", str(i % 3), "x", Path(".")) for i in range(n)]


@pytest.mark.parametrize("subset_num", [1, 2, 3, 4])
def test_shards_cover_every_job_once_with_finished_jobs(subset_num):
    jobs = _jobs(17)
    finished_before = {jobs[i].job_id for i in (0, 4, 5, 11)}
    finished_later = finished_before | {jobs[i].job_id for i in (1, 7)}   # other shards progressed meanwhile
    todo = []
    for idx in range(subset_num):
        # each shard sees a different "finished" state: membership must not depend on it (SPEC §14 #30)
        finished = finished_before if idx % 2 else finished_later
        shard = shard_jobs(jobs, subset_num, idx)
        # the unit is the video (SPEC §10.9): _jobs puts 3 expressions on each video v0, v1, …
        assert shard == [j for k, j in enumerate(jobs) if (k // 3) % subset_num == idx]
        todo += [j.job_id for j in shard if j.job_id not in finished]
    covered = [j.job_id for idx in range(subset_num) for j in shard_jobs(jobs, subset_num, idx)]
    assert sorted(covered) == sorted(j.job_id for j in jobs) and len(covered) == len(set(covered))
    assert len(todo) == len(set(todo)) and set(todo) >= {j.job_id for j in jobs} - finished_later


@pytest.mark.parametrize("num, idx", [(0, 0), (2, 2), (2, -1), (3, 1.0)])
def test_shard_arguments_validated(num, idx):
    with pytest.raises(DecafError, match="^subset_(num|idx) must"):
        shard_jobs(_jobs(3), num, idx)


def test_shard_from_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert shard_from_env(1, 0) == (1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert shard_from_env(1, 0) == (4, 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert shard_from_env(1, 0) == (3, 1)               # torchrun first
    assert shard_from_env(2, 1) == (2, 1)               # explicit flags win
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env(1, 0) == (4, 2)               # a single torchrun task falls through to Slurm
    monkeypatch.setenv("SLURM_PROCID", "x")
    with pytest.raises(DecafError, match="SLURM_PROCID"):
        shard_from_env(1, 0)


def test_group_by_video_keeps_order():
    jobs = _jobs(7)
    groups = group_by_video(jobs)
    assert [[j.job_id for j in g] for g in groups] == [["v0/0", "v0/1", "v0/2"], ["v1/0", "v1/1", "v1/2"], ["v2/0"]]
    assert group_by_video([]) == []


# ---- DAVIS anno ids (§10.2) and GT (§10.7) ---------------------------------------------------------------------
def test_davis_anno_ids_string_sorted(data_root):
    meta = load_meta(data_root / "davis17/meta_expressions/valid/meta_expressions.json")
    mapping = davis_anno_ids(meta)
    # videos sorted ("aero" before "bike"), exp ids sorted as strings: 0, 1, 10, 11, 2, …, 9
    assert mapping[("aero", "0")] == 0 and mapping[("aero", "1")] == 1
    bike_order = ["0", "1", "10", "11", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert [mapping[("bike", e)] for e in bike_order] == list(range(2, 14))
    assert mapping[("bike", "2")] == 6 and mapping[("bike", "10")] == 4
    assert expression_anno_ids("davis", meta, "bike", "11", mapping) == [5]


def test_expression_anno_ids_from_meta():
    meta = {"MOSE/abc": {"expressions": {"0": {"exp": "a", "anno_id": [4, 9]}, "1": {"exp": "b"}}}}
    assert expression_anno_ids("revos", meta, "MOSE/abc", "0", None) == [4, 9]
    assert expression_anno_ids("revos", meta, "MOSE/abc", "1", None) == []


def test_gt_masks_union_none_and_errors():
    a = np.zeros((3, 4), np.uint8)
    a[0, :2] = 1
    b = np.zeros((3, 4), np.uint8)
    b[0, 1:3] = 1
    mask_dict = {"1": [rle(a), None, rle(a)], "2": [rle(b), rle(b), None, rle(b)]}
    gt = gt_masks([1, 2], mask_dict, 3)
    assert gt.dtype == np.uint8 and gt.shape == (3, 3, 4)
    np.testing.assert_array_equal(gt[0], a + b)       # 2 where the objects overlap
    assert gt[0, 0, 1] == 2
    np.testing.assert_array_equal(gt[1], b)
    np.testing.assert_array_equal(gt[2], a)
    np.testing.assert_array_equal(gt_masks([2], mask_dict, 3, indices=[1]), b[None])
    assert not gt_masks([], {}, 2, size=(3, 4)).any()
    assert gt_masks(["1"], {"1": [None, None]}, 2, size=(5, 6)).shape == (2, 5, 6)
    with pytest.raises(DecafError, match="'1' has 3 GT entries for 4 meta frames"):
        gt_masks(["1"], mask_dict, 4)
    with pytest.raises(DecafError, match="anno_id 7 is missing"):
        gt_masks([7], mask_dict, 3)
    with pytest.raises(DecafError, match="expected 5x3"):
        gt_masks([1], mask_dict, 3, size=(3, 5))
    with pytest.raises(DecafError, match="no size"):
        gt_masks([], {}, 2)
