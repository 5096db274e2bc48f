"""The reliability matrix of docs/reliability.md (SPEC §2.2–§2.4, §5.6, §10.9, §11.9, §12.2, §12.6, §13.2).

Rows already covered elsewhere are referenced from docs/reliability.md; this file holds the rest. Models are the
tiny random-weight Qwen2.5-VL and Hiera-T SAM2 at 256 px. Kill and shard tests run the real scripts as subprocesses
and stop them with real signals; full disks are real ``RLIMIT_FSIZE`` write failures, read-only folders are sysfs
(root ignores permission bits, so a chmod'ed folder would not fail).
"""
from __future__ import annotations

import json
import logging
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, frame_path, subprocess_env
from evaluation import eval_rvos
from evaluation import inference_attn_map_qwenvl as stage1_script
from model.adapters.base import AdapterOptions
from model.adapters.qwen import QwenVLAdapter
from model.attention.pipeline import PipelineSettings, PromptingPipeline
from model.cache import load_cache
from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
from model.jobs.runner import JobRunner
from model.stage1 import cache_finished
from model.stage2 import keypoint_main, mask_main
from model.utils.atomic import HOST_TAG, TMP_MARKER, output_claim
from model.utils.errors import EXIT_JOBS_FAILED, EXIT_USER_ERROR, DecafError, run_cli
from test_evaluators import build_davis
from test_stage1_qwen import make_davis

STAGE1 = "evaluation/inference_attn_map_qwenvl.py"
STAGE2 = "inference_attn_mask.py"
N = 3  # sampled frames: every video below has F ≥ N, most F > N
VIDEOS = {"bedroom": (4, ["the bed", "a lamp"]), "room": (3, ["chair", "the window"]), "hall": (5, ["door"]),
          "desk": (4, ["the desk", "a cup"])}
JOB_IDS = [f"{video}/{i}" for video, (_, exps) in VIDEOS.items() for i in range(len(exps))]
#: the jobs of each of two shards: video i (meta order) goes to shard i % 2 with all its expressions (SPEC §10.9)
SHARD_JOBS = {shard: [job for job in JOB_IDS if list(VIDEOS).index(job.split("/")[0]) % 2 == shard]
              for shard in (0, 1)}
DONE_LINE = re.compile(r"decaf\.run: (\S+) done:")


# ------------------------------------------------------------------------------------------------ helpers
def run(script: str, args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def start(script: str, args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(log: Path, marker: str, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while marker not in log.read_text(errors="replace") and proc.poll() is None:
        assert time.monotonic() < deadline, f"{marker!r} never appeared in {log}"
        time.sleep(0.02)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def files_under(root: Path, pattern: str) -> dict[str, bytes]:
    """Relative path → bytes of the result files under ``root`` (dot-entries are temporaries or locks)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob(pattern))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)}


def leftovers(root: Path) -> list[str]:
    """Temporary siblings under ``root``. Lock files may remain after a kill (the kernel released the lock; an
    empty ``.<name>.lock`` means nothing) but never anything else."""
    entries = sorted(p.relative_to(root).as_posix() for p in root.rglob(".*"))
    assert all(TMP_MARKER in name or name.endswith(".lock") for name in entries), entries
    return [name for name in entries if TMP_MARKER in name]


def manifest(folder: Path) -> dict:
    return json.loads(sorted(folder.glob("manifest_*.json"))[-1].read_text())


def dead_pid() -> int:
    """The pid of a process that has exited (for leftovers 'of a killed run')."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cache_name(job_id: str) -> str:
    video, exp = job_id.split("/")
    return f"{video}_{exp}.safetensors"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    return build_tiny_qwen_checkpoint(work / "ckpts" / "tiny-qwen2.5-vl", "qwen2_5_vl")


@pytest.fixture(scope="module")
def sam2(work) -> tuple[Path, str, list[str]]:
    from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint

    path = work / "ckpts" / "tiny_sam2.pt"
    config, overrides = build_tiny_sam2_checkpoint(path, image_size=256, seed=0)
    return path, config, overrides


@pytest.fixture(scope="module")
def bench(work) -> Path:
    return make_davis(work / "bench", VIDEOS)


def stage1_args(bench: Path, ckpt: Path, folder: Path, *extra: str) -> list[str]:
    return ["--dataset", "davis", "--data_root", str(bench), "--version", str(ckpt), "--model_name", "tiny",
            "--num_input_frames", str(N), "--attn_max_token", "16", "--precision", "fp32", "--max_new_tokens", "2",
            "--attn_max_batch", "2", "--device", "cpu", "--attn_save_path", str(folder), *extra]


def stage2_args(bench: Path, caches: Path, out: Path, sam2, *extra: str) -> list[str]:
    checkpoint, config, overrides = sam2
    return ["--dataset", "davis", "--data_root", str(bench), "--model_name", "tiny", "--num_input_frames", str(N),
            "--attn_layer_idx_start", "2", "--attn_save_path", str(caches), "--vis_save_path", str(out),
            "--predict_attn_mask", "--predict_sam_mask", "--device", "cpu", "--vision_pretrained", str(checkpoint),
            "--vision_pretrained_config", config, *extra, "--sam2_overrides", *overrides]


@pytest.fixture(scope="module")
def reference_caches(work, bench, ckpt) -> Path:
    """An uninterrupted stage-1 run: what every interrupted or concurrent run must reproduce byte for byte."""
    folder = work / "caches_reference"
    result = run(STAGE1, stage1_args(bench, ckpt, folder), work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(files_under(folder, "*.safetensors")) == len(JOB_IDS)
    return folder


@pytest.fixture(scope="module")
def reference_masks(work, bench, reference_caches, sam2) -> Path:
    """An uninterrupted stage-2 run (coarse and SAM masks) on the reference caches."""
    out = work / "masks_reference"
    result = run(STAGE2, stage2_args(bench, reference_caches, out, sam2), work)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def adapter(ckpt) -> QwenVLAdapter:
    return QwenVLAdapter(ckpt, device="cpu", precision="fp32", attn_implementation="sdpa",
                         options=AdapterOptions(attn_max_token=16))


# ------------------------------------------------------------------------- kill at random points, then resume
def kill_at_random_points(script: str, args: list[str], cwd: Path, seed: int, job_seconds: float, check) -> int:
    """Start ``script`` three times and SIGKILL it at a seeded random point of its job loop: once its first job
    is done, after a random delay of up to ``job_seconds`` (about one job), so each kill lands while later jobs
    run or write. ``check()`` inspects the output folder after each kill. Returns the pid of the last run."""
    rng = random.Random(seed)
    pid = None
    for attempt in range(3):
        log = cwd / f"killed_{Path(script).stem}_{attempt}.log"
        proc = start(script, args, cwd, log)
        wait_for(log, " done:", proc)
        time.sleep(rng.uniform(0, job_seconds))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pid = proc.pid
        check()
    return pid


def test_stage1_killed_and_resumed_is_byte_identical(work, bench, ckpt, reference_caches):
    reference = files_under(reference_caches, "*.safetensors")
    folder = work / "caches_killed"
    args = stage1_args(bench, ckpt, folder)

    def check() -> None:
        # whatever the kill interrupted, every file with a final name is complete and equal to the reference
        for name, data in files_under(folder, "*.safetensors").items():
            assert data == reference[name], f"{name} differs after a kill"

    killed_pid = kill_at_random_points(STAGE1, args, work, seed=1, job_seconds=0.3, check=check)
    done = files_under(folder, "*.safetensors")
    pending = [name for name in reference if name not in done]
    if not pending:  # the kills all came late: make one job pending again
        pending = [sorted(done)[-1]]
        (folder / pending[0]).unlink()
    # leftovers of killed runs beside a pending job: a complete-looking temporary is still never trusted
    ours = folder / f".{pending[0]}{TMP_MARKER}{HOST_TAG}-{killed_pid}-0000"
    shutil.copyfile(reference_caches / pending[0], ours)
    theirs = folder / f".{pending[0]}{TMP_MARKER}otherhost-{killed_pid}-0000"  # another machine's: left alone
    theirs.write_bytes(b"partial")

    result = run(STAGE1, args, work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(pending)} to run" in result.stderr
    assert files_under(folder, "*.safetensors") == reference
    assert leftovers(folder) == [theirs.name]
    jobs = manifest(folder)["jobs"]
    assert jobs["done"] == len(pending) and jobs["finished_before"] == len(JOB_IDS) - len(pending)


def test_stage2_killed_and_resumed_is_byte_identical(work, bench, reference_caches, reference_masks, sam2):
    reference = files_under(reference_masks, "*.png")
    out = work / "masks_killed"
    args = stage2_args(bench, reference_caches, out, sam2)

    def complete_folders() -> dict[str, list[str]]:
        return {folder.relative_to(out).as_posix(): sorted(p.name for p in folder.iterdir())
                for folder in out.glob("*/*/*") if folder.is_dir() and not folder.name.startswith(".")}

    def check() -> None:
        # every expression folder with its final name holds exactly the reference PNGs, byte for byte
        for folder, names in complete_folders().items():
            assert names == sorted(p.rsplit("/", 1)[1] for p in reference if p.startswith(folder + "/"))
            for name in names:
                assert (out / folder / name).read_bytes() == reference[f"{folder}/{name}"]

    killed_pid = kill_at_random_points(STAGE2, args, work, seed=2, job_seconds=1.2, check=check)
    sam_root = out / "sam-mask"
    pending = [job for job in JOB_IDS if not (sam_root / job).is_dir()]
    if not pending:
        pending = [JOB_IDS[-1]]
        shutil.rmtree(sam_root / pending[0])
    video, exp = pending[0].split("/")
    leftover = sam_root / video / f".{exp}{TMP_MARKER}{HOST_TAG}-{killed_pid}-0000"  # a half-written folder
    leftover.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reference_masks / "sam-mask" / video / exp / "00000.png", leftover / "00000.png")

    result = run(STAGE2, args, work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(out, "*.png") == reference
    assert leftovers(out) == []
    assert manifest(sam_root)["failures"] == []


# ------------------------------------------------------------------------------ concurrent processes, claims
HOLD_CLAIM = """
import sys, time
from model.utils.atomic import output_claim
with output_claim(sys.argv[1]) as claimed:
    print("claimed" if claimed else "busy", flush=True)
    time.sleep(600)
"""


def test_shards_started_at_different_times_compute_every_job_once(work, bench, ckpt, reference_caches):
    """Shard 0/2, shard 1/2 and a second process of shard 0/2 start 0.25 s apart on one cache folder; a fourth
    process holds the claim of one job. Every other job is computed exactly once; the held job is left to the
    holder, and once the holder is killed (SIGKILL releases its claim) a later run computes it."""
    folder = work / "caches_shared"
    held = JOB_IDS[4]  # hall/0: shard 0 (hall is video 2)
    holder_log = work / "holder.log"
    with open(holder_log, "wb") as out:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(folder / cache_name(held))], cwd=REPO,
                                  env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(holder_log, "claimed", holder)
        procs = {}
        for name, shard in (("s0", "0"), ("s1", "1"), ("s0b", "0")):
            procs[name] = start(STAGE1, stage1_args(bench, ckpt, folder, "--subset_num", "2", "--subset_idx", shard),
                                work, work / f"shard_{name}.log")
            time.sleep(0.25)  # close enough that the two shard-0 processes usually list the same pending jobs
        for proc in procs.values():
            assert proc.wait(timeout=300) == 0
        logs = {name: (work / f"shard_{name}.log").read_text() for name in procs}
        done = {name: DONE_LINE.findall(text) for name, text in logs.items()}
        counts = Counter(job for jobs in done.values() for job in jobs)
        assert set(counts) == set(JOB_IDS) - {held} and set(counts.values()) == {1}, counts
        assert set(done["s1"]) == set(SHARD_JOBS[1])
        assert set(done["s0"]) | set(done["s0b"]) == set(SHARD_JOBS[0]) - {held}
        assert f"{held}: being computed by another process" in logs["s0"] + logs["s0b"]
        assert not (folder / cache_name(held)).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died mid-job: its claim is gone with it, its temporary leftover is removed by the next claimant
    leftover = folder / f".{cache_name(held)}{TMP_MARKER}{HOST_TAG}-{holder.pid}-0000"
    leftover.write_bytes(b"half a cache")
    result = run(STAGE1, stage1_args(bench, ckpt, folder), work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE_LINE.findall(result.stderr) == [held]
    assert files_under(folder, "*.safetensors") == files_under(reference_caches, "*.safetensors")
    assert leftovers(folder) == []


def test_stage2_and_keypoints_leave_claimed_jobs_to_their_holder(work, bench, reference_caches, monkeypatch):
    """In-process: the test holds the claim of one output (flock conflicts between open files, even in one
    process); the run leaves that job, records it in the manifest and still exits 0."""
    monkeypatch.chdir(work)
    out = work / "masks_claimed"
    held = out / "bedroom" / "1"
    base = ["--dataset", "davis", "--data_root", str(bench), "--model_name", "tiny", "--num_input_frames", str(N),
            "--attn_layer_idx_start", "2", "--attn_save_path", str(reference_caches)]
    with output_claim(held) as claimed:
        assert claimed
        assert mask_main([*base, "--predict_attn_mask", "--vis_save_path", str(out)]) == 0
        with output_claim(work / "kp" / "room" / "0" / "keypoints.pt"):
            assert keypoint_main([*base, "--vis_save_path", str(work / "kp")]) == 0
    record = manifest(out)
    assert record["claimed_elsewhere"] == ["bedroom/1"] and record["jobs"]["done"] == len(JOB_IDS) - 1
    assert not held.exists() and (out / "bedroom" / "0").is_dir()
    assert manifest(work / "kp")["claimed_elsewhere"] == ["room/0"]
    assert not (work / "kp" / "room" / "0").exists()  # the claim's empty folders are removed with it
    assert mask_main([*base, "--predict_attn_mask", "--vis_save_path", str(out)]) == 0
    assert manifest(out)["jobs"] == {"in_shard": len(JOB_IDS), "finished_before": len(JOB_IDS) - 1, "done": 1,
                                     "failed": 0}


def test_claim_dies_with_its_process(tmp_path):
    target = tmp_path / "out" / "job.safetensors"
    log = tmp_path / "holder.log"
    with open(log, "wb") as out:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(target)], cwd=REPO, env=subprocess_env(),
                                  stdout=out, stderr=subprocess.STDOUT)
    wait_for(log, "claimed", holder)
    with output_claim(target) as claimed:
        assert not claimed
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with output_claim(target) as claimed:
        assert claimed
    assert list((tmp_path / "out").iterdir()) == []  # the dead holder's lock file went with the next claim


# ------------------------------------------------------------------------------------------- bad frame folders
def test_bad_frame_folders_fail_their_jobs_and_the_run_goes_on(tmp_path, ckpt):
    """Stage 1: each broken video fails its jobs with a line naming it; the manifest lists them; the good jobs
    finish — empty and whitespace-only expressions included, as in the paper (SPEC §2.1), warned about once and
    listed in the manifest; a missing folder is skipped and reported (SPEC §10.9); --fail_fast stops at the
    first failure."""
    videos = {"good": (3, ["the bed", "", "   "]), "empty": (2, ["x"]), "notimages": (2, ["x"]), "stray": (3, ["x"]),
              "truncated": (3, ["x"]), "textjpg": (3, ["x"]), "mixed": (3, ["x"]), "gone": (2, ["x"])}
    data = make_davis(tmp_path / "data", videos)
    root = data / "davis17/valid/JPEGImages"
    for name in ("empty", "notimages"):
        for frame in root.joinpath(name).iterdir():
            frame.unlink()
    (root / "notimages" / "notes.txt").write_text("not a frame")
    (root / "stray" / "Thumbs.db").write_bytes(b"\0" * 10)  # ignored with a warning (SPEC §2.2)
    jpeg = (root / "truncated" / "00002.jpg").read_bytes()
    (root / "truncated" / "00002.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # header fine, pixels cut
    (root / "textjpg" / "00001.jpg").write_text("this is text")
    Image.open(root / "mixed" / "00002.jpg").resize((480, 270)).save(root / "mixed" / "00002.jpg")
    shutil.rmtree(root / "gone")
    folder = tmp_path / "caches"

    result = run(STAGE1, stage1_args(data, ckpt, folder), tmp_path)
    assert result.returncode == EXIT_JOBS_FAILED, result.stderr[-3000:]
    record = manifest(folder)
    errors = {f["job"]: f["error"] for f in record["failures"]}
    assert set(errors) == {"empty/0", "notimages/0", "truncated/0", "textjpg/0", "mixed/0"}
    assert record["empty_expressions"] == ["good/1", "good/2"]
    assert result.stderr.count("expression(s) are empty or whitespace only") == 1
    assert [w for w in record["warnings"] if "2 expression(s) are empty" in w]
    prompts = {name: load_cache(folder / f"good_{name}.safetensors").meta["prompts"]["obj"] for name in (1, 2)}
    assert prompts[1].startswith(". \n") and prompts[2].startswith("   . \n")  # q = exp + "." (§2.1)
    assert re.search(r"no \.jpg frames in .*/empty$", errors["empty/0"])
    assert re.search(r"no \.jpg frames in .*/notimages$", errors["notimages/0"])
    assert re.search(r"cannot decode image .*/truncated/00002\.jpg", errors["truncated/0"])
    assert re.search(r"cannot read image .*/textjpg/00001\.jpg", errors["textjpg/0"])
    assert re.search(r"video .*/mixed: frame 00002\.jpg is 480x270 but frame 0 is 960x540", errors["mixed/0"])
    for job in errors:  # one line per failed job, naming the job (hence its video)
        assert re.search(rf"ERROR decaf\.run: {job} failed: \S", result.stderr)
    assert record["skipped_videos"] == [{"video": "gone", "reason": f"frame folder {root / 'gone'} not found"}]
    assert sorted(files_under(folder, "*.safetensors")) == ["good_0.safetensors", "good_1.safetensors",
                                                             "good_2.safetensors", "stray_0.safetensors"]
    assert "ignoring 1 non-frame entry (e.g. Thumbs.db)" in result.stderr
    assert last_line(result.stderr).startswith("error: 5 of 9 job(s) failed (first: empty/0: no .jpg frames")
    assert str(sorted(folder.glob("manifest_*.json"))[-1]) in last_line(result.stderr)

    fast = tmp_path / "caches_fail_fast"
    result = run(STAGE1, stage1_args(data, ckpt, fast, "--fail_fast"), tmp_path)
    assert result.returncode == EXIT_JOBS_FAILED
    assert [f["job"] for f in manifest(fast)["failures"]] == ["empty/0"]
    assert sorted(files_under(fast, "*.safetensors")) == ["good_0.safetensors", "good_1.safetensors",
                                                           "good_2.safetensors"]


def test_stage2_bad_frame_folders_and_meta_mismatch(work, bench, reference_caches, sam2, tmp_path, monkeypatch):
    """Stage 2 (in process, SAM2 included) on a copy of the benchmark whose frames changed after stage 1."""
    data = tmp_path / "bench"
    shutil.copytree(bench, data)
    root = data / "davis17/valid/JPEGImages"
    Image.open(root / "room" / "00001.jpg").resize((480, 270)).save(root / "room" / "00001.jpg")  # mixed sizes
    jpeg = (root / "hall" / "00003.jpg").read_bytes()  # an unsampled frame: only SAM2 decodes it
    (root / "hall" / "00003.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "desk" / "00003.jpg").rename(root / "desk" / "00003b.jpg")  # files ≠ meta frames: a warning
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    status = mask_main(stage2_args(data, reference_caches, out, sam2))
    assert status == EXIT_JOBS_FAILED
    record = manifest(out / "sam-mask")
    errors = {f["job"]: f["error"] for f in record["failures"]}
    assert set(errors) == {"room/0", "room/1", "hall/0"}
    assert "video" in errors["room/0"] and "/room: frame 00001.jpg is 480x270" in errors["room/0"]
    assert re.search(r"cannot decode frame .*/hall/00003\.jpg", errors["hall/0"])
    (warning,) = [w for w in record["warnings"] if "meta lists" in w]
    assert warning.startswith("video desk: meta lists 4 frames but") and "meta_expressions.json" in warning
    assert sorted(p.name for p in (out / "sam-mask" / "desk" / "0").iterdir())[-1] == "00003b.png"
    assert sorted(p.name for p in (out / "sam-mask").iterdir() if p.is_dir()) == ["bedroom", "desk"]


# ------------------------------------------------------------------------------------------------ expressions
def test_expression_of_10k_characters(adapter):
    words = " ".join(random.Random(0).choice(["red", "cup", "on", "the", "left", "table", "near"]) for _ in range(2400))
    expression = ("the " + words)[:10_000]
    frames = [frame_path(0)]
    pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=2, layer_end=4, max_new_tokens=2))
    try:
        result = pipeline.run(frames, expression)
    finally:
        pipeline.capture.detach()
    assert len(expression) == 10_000 and result.prompts["obj"].startswith(expression[:50])
    for tensor in result.maps.values():
        assert torch.isfinite(tensor).all() and tensor.min() >= 0


# --------------------------------------------------------------------------------------- CUDA out of memory
class OutOfMemoryAbove(QwenVLAdapter):
    """The real adapter, whose LLM forward raises CUDA's out-of-memory error for batches above ``limit`` rows
    (an injected failure: CPU tests have no GPU memory to exhaust)."""

    limit = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.language_model.register_forward_pre_hook(self._out_of_memory, with_kwargs=True)

    def _out_of_memory(self, module, args, kwargs):
        rows = next(t for t in (kwargs.get("inputs_embeds"), kwargs.get("input_ids")) if t is not None).shape[0]
        if rows > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected for {rows} rows)")


def test_auto_batch_halves_on_out_of_memory(ckpt, caplog):
    adapter = OutOfMemoryAbove(ckpt, device="cpu", precision="fp32", attn_implementation="sdpa",
                               options=AdapterOptions(attn_max_token=16))
    frames = [frame_path(i) for i in range(5)]
    results = {}
    for batch in ("auto", 2):
        pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=2, layer_end=4, attn_max_batch=batch,
                                                               max_new_tokens=2))
        try:
            with caplog.at_level(logging.WARNING, logger="model.attention.pipeline"):
                results[batch] = pipeline.run(frames, "the bed")
        finally:
            pipeline.capture.detach()
    steps = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert steps == ["CUDA out of memory on a frame chunk of 5; retrying with chunks of 2"] * 2  # calls 2 and 5
    assert results["auto"].texts == results[2].texts
    for name, tensor in results[2].maps.items():
        assert torch.equal(results["auto"].maps[name], tensor), name
    with pytest.raises(torch.OutOfMemoryError):  # a fixed chunk size never backs off
        pipeline = PromptingPipeline(adapter, PipelineSettings(layer_start=2, layer_end=4, attn_max_batch=3,
                                                               max_new_tokens=2))
        try:
            pipeline.run(frames, "the bed")
        finally:
            pipeline.capture.detach()


# ---------------------------------------------------------------------------- checkpoints and SAM2 up front
def test_checkpoint_without_processor_or_weights_fails_before_any_job(tmp_path, ckpt, bench, capsys):
    broken = tmp_path / "no-processor"
    shutil.copytree(ckpt, broken)
    for name in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"):
        (broken / name).unlink(missing_ok=True)
    damaged = tmp_path / "damaged-weights"
    shutil.copytree(ckpt, damaged)
    for weights in damaged.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    for version, pattern in ((broken, r"has no processor config"), (damaged, r"cannot load the model from")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(stage1_script.main, stage1_args(bench, version, tmp_path / "caches"))
        assert exit_info.value.code == EXIT_USER_ERROR
        line = last_line(capsys.readouterr().err)
        assert line.startswith("error: ") and str(version) in line and re.search(pattern, line), line
        assert not list((tmp_path / "caches").glob("*.safetensors"))


def test_missing_sam2_config_fails_before_any_job(tmp_path, bench, reference_caches, sam2, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint, _, overrides = sam2
    args = stage2_args(bench, reference_caches, tmp_path / "out", (checkpoint, "sam2_hiera_nope.yaml", overrides))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(mask_main, args)
    assert exit_info.value.code == EXIT_USER_ERROR
    assert last_line(capsys.readouterr().err).startswith("error: unknown SAM2 config 'sam2_hiera_nope.yaml'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("breakage, pattern", [
    ("missing", r"meta file not found: .*meta_expressions\.json"),
    ("not_json", r"meta_expressions\.json is not valid JSON"),
    ("exp_null", r"meta file .*meta_expressions\.json: expression bedroom/0 has no 'exp' text"),
])
def test_broken_meta_is_one_line_before_any_job(tmp_path, bench, reference_caches, capsys, monkeypatch, breakage,
                                                pattern):
    data = tmp_path / "bench"
    shutil.copytree(bench, data)
    meta = data / "davis17/meta_expressions/valid/meta_expressions.json"
    if breakage == "missing":
        meta.unlink()
    elif breakage == "not_json":
        meta.write_text(meta.read_text()[:-5])
    else:
        content = json.loads(meta.read_text())
        content["videos"]["bedroom"]["expressions"]["0"]["exp"] = None
        meta.write_text(json.dumps(content))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(mask_main, ["--dataset", "davis", "--data_root", str(data), "--model_name", "tiny",
                            "--num_input_frames", str(N), "--attn_layer_idx_start", "2", "--attn_save_path",
                            str(reference_caches), "--predict_attn_mask", "--vis_save_path", "out"])
    assert exit_info.value.code == EXIT_USER_ERROR
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert not list((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize("content, pattern", [
    (b"\x80\x04not a pickle", r"mask_dict\.pkl is not a readable pickle"),
    (b"\x80\x04]\x94.", r"mask file .*mask_dict\.pkl must hold a dict, got list"),
], ids=["not_a_pickle", "not_a_dict"])
def test_malformed_mask_dict_is_one_line(tmp_path, capsys, content, pattern):
    root, pred_root, *_ = build_davis(tmp_path, with_expected=False)
    (root / "davis17/valid/mask_dict.pkl").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_rvos.main, [str(pred_root), "--dataset", "davis", "--data_root", str(root)])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(pattern, err[0]), err


# --------------------------------------------------------------------------------------------- cache files
def test_truncated_and_old_format_caches_name_the_file(tmp_path, reference_caches):
    source = reference_caches / "bedroom_0.safetensors"
    good = load_cache(source)
    expected = {key: good.meta[key] for key in ("family", "checkpoint", "num_layers", "layer_start", "layer_end",
                                                "num_input_frames", "prompt_versions", "settings")}
    tensors = load_file(source)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"decaf": json.dumps({**good.meta, "format_version": 0})})
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign))
    for path, reason in ((truncated, "cannot parse the file"), (old, "format_version 0 is not supported"),
                         (foreign, "no 'decaf' metadata")):
        with pytest.raises(DecafError, match=rf"invalid attention cache {re.escape(str(path))}: {reason}"):
            cache_finished(path, expected)
        # --overwrite recomputes it without reading it
        overwrite = JobRunner(lambda _kind, cache: cache_finished(cache, expected), overwrite=True)
        assert overwrite.missing({"attn-map": path}) == {"attn-map": path}
    assert cache_finished(source, expected) is True


# -------------------------------------------------------------------------------- full disks, unwritable folders
FULL_DISK = """
import resource, signal, sys
import numpy as np, torch
from model.cache import load_cache, save_cache
from model.utils.errors import DecafError
from model.maps.keypoints import save_keypoints
from model.utils.mask_png import write_mask_folder
from model.utils.atomic import atomic_write_json
cache = load_cache(sys.argv[1])
maps = {"obj_video": cache.obj_video, "obj_frame": cache.obj_frame, "bg_video": cache.bg_video,
        "bg_frame": cache.bg_frame}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
out = sys.argv[2]
for write in (lambda: save_cache(out + "/cache.safetensors", maps, cache.meta),
              lambda: write_mask_folder(out + "/masks/0", ["00000"], np.random.rand(1, 540, 960) > 0.5),
              lambda: save_keypoints(out + "/kp/keypoints.pt", torch.rand(100, 4)),
              lambda: atomic_write_json(out + "/summary.json", {"x": "y" * 1000})):
    try:
        write()
        print("written")
    except DecafError as exc:
        print("error:", exc)
"""


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, reference_caches):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(reference_caches / "bedroom_0.safetensors"),
                             str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    targets = ["cache.safetensors", "masks/0", "kp/keypoints.pt", "summary.json"]
    assert [line.split(":")[0] for line in lines] == ["error"] * 4, lines
    for line, target in zip(lines, targets):
        assert line == f"error: cannot write {out / target}: File too large"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["kp", "masks"]  # empty folders only


def test_full_disk_during_a_run_fails_every_job_cleanly(tmp_path, bench, reference_caches):
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    args = ["--dataset", "davis", "--data_root", str(bench), "--model_name", "tiny", "--num_input_frames", str(N),
            "--attn_layer_idx_start", "2", "--attn_save_path", str(reference_caches), "--predict_attn_mask",
            "--vis_save_path", str(out)]
    result = run(STAGE2, args, tmp_path, preexec_fn=limit_file_size)
    assert result.returncode == EXIT_JOBS_FAILED, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith(f"error: {len(JOB_IDS)} of {len(JOB_IDS)} job(s) failed (first: bedroom/0: cannot write "
                           f"{out / 'bedroom' / '0'}: File too large)")
    assert "the run manifest was not written: cannot write" in line
    assert list(out.rglob("*")) == []  # no mask, no temporary, no lock, no empty video folder


@pytest.mark.parametrize("target", ["/sys/kernel/decaf_outputs", "{file}/outputs"])
def test_unwritable_output_folder_is_one_line_before_any_job(tmp_path, bench, ckpt, reference_caches, capsys,
                                                             monkeypatch, target):
    """sysfs refuses new entries even to root; a path below a regular file cannot be a folder."""
    (tmp_path / "file").write_text("a file")
    folder = target.format(file=tmp_path / "file")
    monkeypatch.chdir(tmp_path)
    reason = "Operation not permitted" if folder.startswith("/sys") else "Not a directory"
    for main, args in ((stage1_script.main, stage1_args(bench, ckpt, Path(folder))),
                       (mask_main, ["--dataset", "davis", "--data_root", str(bench), "--model_name", "tiny",
                                    "--num_input_frames", str(N), "--attn_layer_idx_start", "2", "--attn_save_path",
                                    str(reference_caches), "--predict_attn_mask", "--vis_save_path", folder])):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, args)
        assert exit_info.value.code == EXIT_USER_ERROR
        assert last_line(capsys.readouterr().err) == f"error: output folder {folder} is not writable: {reason}"


# ----------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_says_what_finished_and_how_to_resume(capsys):
    from types import SimpleNamespace

    from model.utils.run_record import RunRecord

    def main(argv):
        record = RunRecord(total=5, description="test", fail_fast=False)
        record.skip(2)
        record.succeed(SimpleNamespace(job_id="v/0"), "ok")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    assert exit_info.value.code == 130
    line = capsys.readouterr().err.split("interrupted: ")[-1]  # after the (carriage-return) progress bar
    assert "1 of 5 job(s) finished in this run (2 were finished before, 0 failed)" in line
    assert "run the same command again to resume" in line
