"""The web demo (issue 18): its input checks in process, and the page in a real headless Chromium.

The browser tests start ``python -m model.webdemo --tiny`` as a subprocess on a free local port (tiny random-weight
Qwen2.5-VL and SAM2, built at start-up as the self-test builds them) and drive the page with Playwright pointed at
Debian's ``/usr/bin/chromium`` (no browser download). They upload clips made from the test frames, run the
pipeline, and fetch the overlay video, the gallery images and the mask ZIP back from the server to decode them;
the video is also decoded by the browser itself. Random weights make the masks meaningless: the tests check
presence, counts, sizes and formats. ``DECAF_WEBDEMO_SCREENSHOT=docs/webdemo.png`` saves the finished page there.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, copy_frames, subprocess_env
from model.utils.errors import DecafError

CHROMIUM = Path("/usr/bin/chromium")
#: what Chromium needs on these machines: no sandbox as root, no GPU, no calls to Google's services
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_FRAMES = 4  # frames of the uploaded clip (--tiny samples N = 4)
#: the server's N (--tiny): all 4 frames are sampled. The page's knobs reach the loaded models through
#: Segmenter.update_settings (test_update_settings_changes_only_per_call_settings); setting a slider from the browser
#: raced with the request on a loaded machine, so the browser test leaves them at their defaults
SAMPLED = 4
MAX_FRAMES = 6  # the server's --max_frames, so that a 7-frame clip is "too long"
RUN_TIMEOUT_MS = 180_000  # one request on two loaded CPU cores takes ~15 s; leave room


def zip_frames(frames: list[Path], path: Path, folder: str = "clip") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for frame in frames:
            archive.write(frame, f"{folder}/{frame.name}")
    return path


# --------------------------------------------------------------------------------------------- in process
def test_zip_frames_are_flattened_by_base_name(tmp_path):
    from model.webdemo import extract_frames_zip

    frames = copy_frames(tmp_path / "src", 2)
    archive = tmp_path / "clip.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.write(frames[0], "deep/folder/00000.jpg")
        out.write(frames[1], "../../escape/00001.JPEG")  # a hostile path lands inside the target as 00001.jpg
        out.writestr("__MACOSX/._00000.jpg", b"resource fork")
        out.writestr("notes.txt", b"ignored")
    folder = extract_frames_zip(archive, tmp_path / "out" / "clip", max_frames=10)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.jpg", "00001.jpg"]
    assert (folder / "00001.jpg").read_bytes() == frames[1].read_bytes()
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("case, message", [
    ("not_a_zip", "is not a readable ZIP file"),
    ("no_frames", "holds no .jpg frames"),
    ("too_many", "more than the 2 this server accepts"),
    ("duplicates", "two frames of one name"),
])
def test_bad_zip_is_one_readable_error(tmp_path, case, message):
    from model.webdemo import extract_frames_zip

    frames = copy_frames(tmp_path / "src", 3)
    archive = tmp_path / "clip.zip"
    if case == "not_a_zip":
        archive.write_bytes(b"PK but not really")
    else:
        with zipfile.ZipFile(archive, "w") as out:
            if case == "no_frames":
                out.writestr("readme.txt", b"x")
            elif case == "too_many":
                for frame in frames:
                    out.write(frame, frame.name)
            else:
                out.write(frames[0], "a/00000.jpg")
                out.write(frames[1], "b/00000.jpg")
    with pytest.raises(DecafError, match=message):
        extract_frames_zip(archive, tmp_path / "out", max_frames=2)
    assert not (tmp_path / "out").exists()  # refused before anything is extracted


def test_open_input_refuses_long_clips_mixed_sizes_and_nothing(tmp_path):
    from model.webdemo import open_input

    folder = tmp_path / "clip"
    frames = copy_frames(folder, 3)
    source = open_input(None, f"  {folder}  ", tmp_path / "scratch", max_frames=3)
    assert source.name == "clip" and source.frames == frames
    with pytest.raises(DecafError, match="3 frames, more than the 2"):
        open_input(None, str(folder), tmp_path / "scratch", max_frames=2)
    with pytest.raises(DecafError, match="no video"):
        open_input(None, "  ", tmp_path / "scratch", max_frames=3)
    with pytest.raises(DecafError, match="does not exist on the server"):
        open_input(None, str(tmp_path / "missing"), tmp_path / "scratch", max_frames=3)
    small = cv2.resize(cv2.imread(str(frames[2])), (480, 270))
    cv2.imwrite(str(frames[2]), small)
    with pytest.raises(DecafError, match="all frames of a video must have one size"):
        open_input(None, str(folder), tmp_path / "scratch", max_frames=3)


def test_flags_reuse_the_cli_demo_and_tiny_defaults_yield_to_given_flags():
    from model.api import SegmentSettings
    from model.webdemo import parse_args

    paper = parse_args([])
    assert (paper.num_input_frames, paper.point_threshold, paper.attn_max_batch) == (
        SegmentSettings().num_input_frames, SegmentSettings().point_threshold, SegmentSettings().attn_max_batch)
    assert paper.host == "127.0.0.1"
    tiny = parse_args(["--tiny"])
    assert (tiny.num_input_frames, tiny.precision, tiny.max_new_tokens) == (4, "fp32", 4)
    assert parse_args(["--tiny", "--num_input_frames", "2"]).num_input_frames == 2
    assert parse_args(["--tiny", "--version", "x"]).version == "x"  # as in demo.py, a given flag wins
    for bad in (["--video_path", "clip"], ["--max_frames", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# ------------------------------------------------------------------------------------------------ browser
def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Python playwright is not installed (pip install -e \".[dev]\")")
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip("gradio is not installed (pip install -e \".[dev]\")")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    return sync_playwright


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m model.webdemo --tiny`` on a free port; yields its URL, stops it (SIGTERM) afterwards."""
    sync_playwright = _playwright()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "model.webdemo", "--tiny", "--device", "cpu",
                                    "--tiny_ckpts", str(log_path.parent / "ckpts"),
                                    "--port", str(port), "--max_frames", str(MAX_FRAMES)],
                                   cwd=REPO, env=subprocess_env(GRADIO_ANALYTICS_ENABLED="False"),
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "web demo ready at" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 240 s"
            time.sleep(0.5)
        print(f"web demo start-up: {time.perf_counter() - started:.1f} s from process start")
        yield {"url": f"http://127.0.0.1:{port}/", "log": log_path, "playwright": sync_playwright}
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=30) == 0, log_path.read_text(errors="replace")[-3000:]
        finally:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def page(server):
    with server["playwright"]() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(60_000)
            tab.goto(server["url"])
            yield tab
        finally:
            browser.close()


def submit(page, upload: Path | None, expression: str, path_text: str = "",
           during: str | re.Pattern | None = None) -> str:
    """Fill the form, press Segment and return the status text once the request finished; ``during`` is a
    progress text that must show while it runs."""
    from playwright.sync_api import expect

    upload_box = page.locator("#upload")
    if upload_box.locator("button[aria-label='Clear']").count():  # a file from the previous request
        upload_box.locator("button[aria-label='Clear']").first.click()
    if upload is not None:
        upload_box.locator("input[type=file]").set_input_files(str(upload))
        expect(upload_box.locator(f"td.filename[aria-label='{upload.name}']")).to_be_visible()  # uploaded
    page.locator("#path textarea, #path input").first.fill(path_text)
    page.locator("#expression textarea, #expression input").first.fill(expression)
    marker = page.locator("#status [data-request]")
    previous = int(marker.get_attribute("data-request")) if marker.count() else 0
    page.locator("#run").click()
    if during is not None:
        expect(page.get_by_text(during).first).to_be_visible(timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(f"""() => {{ const m = document.querySelector('#status [data-request]');
                                        return m && Number(m.dataset.request) > {previous}; }}""",
                           timeout=RUN_TIMEOUT_MS)
    return page.locator("#status").inner_text()


def fetch(page, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, (url, response.status)
    return response.body()


@pytest.mark.slow  # with the server's start-up: ~40 s on 2 loaded cores
def test_page_errors_are_readable_and_the_server_keeps_serving(page, tmp_path):
    frames = copy_frames(tmp_path / "frames", MAX_FRAMES + 1)
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    mixed = tmp_path / "mixed"
    copy_frames(mixed, 2)
    cv2.imwrite(str(mixed / "00001.jpg"), cv2.resize(cv2.imread(str(mixed / "00001.jpg")), (480, 270)))
    cases = [
        (None, "the bed", "no video: upload a video file"),
        (zip_frames(frames[:2], tmp_path / "ok.zip"), "   ", "the expression is empty"),
        (corrupt, "the bed", "broken.mp4"),
        (zip_frames(sorted(mixed.iterdir()), tmp_path / "mixed.zip"), "the bed", "must have one size"),
        (zip_frames(frames, tmp_path / "long.zip"), "the bed", f"more than the {MAX_FRAMES} this server accepts"),
    ]
    for upload, expression, message in cases:
        text = submit(page, upload, expression)
        assert "Error" in text and message in text, (message, text)
        # nothing is offered after a failed request
        assert page.locator("#masks-zip a[href]").count() == 0
        assert page.locator("#overlay-video video").count() == 0
        assert page.locator("#gallery img").count() == 0

    # the example fills in the bundled sample clip with one click
    from playwright.sync_api import expect

    page.get_by_text(str(REPO / "assets" / "sample_clip")).first.click()
    expect(page.locator("#path textarea, #path input").first).to_have_value(str(REPO / "assets" / "sample_clip"))
    expect(page.locator("#expression textarea, #expression input").first).not_to_have_value("")


@pytest.mark.slow
def test_page_segments_an_upload_and_its_outputs_decode(page, server, tmp_path):
    frames = copy_frames(tmp_path / "bedroom", NUM_FRAMES, step=10)
    archive = zip_frames(frames, tmp_path / "bedroom.zip", folder="bedroom")
    started = time.perf_counter()
    # the progress names the stage (SAM2 on 4 frames takes seconds even on a fast CPU): the stage's line, or its
    # phase bars, which the page tracks from tqdm while they run
    text = submit(page, archive, "the girl jumping on the bed",
                  during=re.compile(rf"SAM2 (on {NUM_FRAMES} frames|phase [12])"))
    print(f"web demo request ({NUM_FRAMES} frames, tiny checkpoints, CPU): {time.perf_counter() - started:.1f} s")
    assert f"Done: {NUM_FRAMES} frames, {SAMPLED} sampled" in text, text
    height, width = cv2.imread(str(frames[0])).shape[:2]

    # the overlay video: decoded by the browser itself, then fetched and decoded with OpenCV
    video = page.locator("#overlay-video video")
    page.wait_for_function("() => { const v = document.querySelector('#overlay-video video');"
                           " return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=60_000)
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [width, height]
    video_path = tmp_path / ("overlay" + Path(video.get_attribute("src")).suffix)
    video_path.write_bytes(fetch(page, video.get_attribute("src")))
    capture = cv2.VideoCapture(str(video_path))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame.shape)
    capture.release()
    assert decoded == [(height, width, 3)] * NUM_FRAMES

    # the gallery: four images per sampled frame (fused map, coarse mask, points, SAM2 mask), half size
    images = page.locator("#gallery img")
    assert images.count() == 4 * SAMPLED
    for index in range(images.count()):
        with Image.open(io.BytesIO(fetch(page, images.nth(index).get_attribute("src")))) as image:
            image.load()
            assert image.size == (width // 2, height // 2)
    assert page.locator("#gallery").get_by_text("fused map").count() >= 1

    # the mask ZIP: one 0/255 PNG of the frame size per frame
    link = page.locator("#masks-zip a[href]").first
    with zipfile.ZipFile(io.BytesIO(fetch(page, link.get_attribute("href")))) as archive_out:
        names = sorted(archive_out.namelist())
        assert names == [f"bedroom_masks/{i:05d}.png" for i in range(NUM_FRAMES)]
        for name in names:
            with Image.open(io.BytesIO(archive_out.read(name))) as mask:
                assert mask.mode == "L" and mask.size == (width, height)
                assert set(np.unique(np.asarray(mask))) <= {0, 255}

    # the MLLM's answers, the stage times and the random-weights banner are in the page
    assert "obj_name" in page.locator("#answers").inner_text()
    timings = page.locator("#timings").inner_text()
    for stage in ("stage 1 (MLLM calls)", "SAM2", "total"):
        assert stage in timings
    assert "random weights give meaningless masks" in page.locator("#tiny-banner").inner_text()

    shot = tmp_path / "webdemo.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("DECAF_WEBDEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DECAF_WEBDEMO_SCREENSHOT"])


def test_help_explains_every_flag_without_gradio_loaded():
    from test_cli_help import undocumented_options

    result = subprocess.run([sys.executable, "-m", "model.webdemo", "--help"], cwd=REPO, capture_output=True,
                            text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--tiny", "--max_frames", "--host", "--port", "--version", "--num_input_frames"):
        assert flag in result.stdout
    assert "--video_path" not in result.stdout  # the CLI demo's input flags are left out
    assert undocumented_options(result.stdout) == []


def test_busy_port_is_one_line_before_models_load(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "model.webdemo", "--tiny", "--port", str(port),
                                 "--tiny_ckpts", str(tmp_path / "never-built")], cwd=REPO,
                                capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "building tiny" not in result.stderr and not (tmp_path / "never-built").exists()


@pytest.mark.slow
def test_page_segments_a_video_file_at_its_frame_rate(page, tmp_path):
    """An MP4 upload (decoded by the API) comes back as an overlay video at the source frame rate."""
    frames = copy_frames(tmp_path / "frames", 2, step=15)
    height, width = cv2.imread(str(frames[0])).shape[:2]
    clip = tmp_path / "two.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (width, height))
    for frame in frames:
        writer.write(cv2.imread(str(frame)))
    writer.release()
    text = submit(page, clip, "the bed")
    assert "Done: 2 frames, 2 sampled" in text, text
    video = page.locator("#overlay-video video")
    path = tmp_path / ("overlay" + Path(video.get_attribute("src")).suffix)
    path.write_bytes(fetch(page, video.get_attribute("src")))
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    capture.release()
    link = page.locator("#masks-zip a[href]").first
    with zipfile.ZipFile(io.BytesIO(fetch(page, link.get_attribute("href")))) as out:
        assert sorted(out.namelist()) == ["two_masks/00000.png", "two_masks/00001.png"]


def test_update_settings_changes_only_per_call_settings(tmp_path):
    from model.api import Segmenter, SegmentSettings
    from model.selftest.tiny.qwen import build_tiny_qwen_checkpoint
    from model.selftest.tiny.sam2 import build_tiny_sam2_checkpoint

    qwen = build_tiny_qwen_checkpoint(tmp_path / "qwen", "qwen2_5_vl", num_layers=2)
    config, overrides = build_tiny_sam2_checkpoint(tmp_path / "sam2.pt", image_size=256)
    with Segmenter(qwen, tmp_path / "sam2.pt", config, settings=SegmentSettings(num_input_frames=4), device="cpu",
                   precision="fp32", attn_implementation="sdpa", sam2_overrides=overrides) as segmenter:
        segmenter.update_settings(num_input_frames=2, attn_max_batch="auto", point_threshold=0.5)
        assert (segmenter.settings.num_input_frames, segmenter.settings.point_threshold) == (2, 0.5)
        assert segmenter.pipeline.settings.attn_max_batch == "auto"  # what stage 1 reads on its next call
        before = segmenter.settings
        with pytest.raises(DecafError, match="attn_max_token cannot change after loading"):
            segmenter.update_settings(attn_max_token=16)
        with pytest.raises(DecafError, match="num_input_frames must be positive"):
            segmenter.update_settings(num_input_frames=0)
        assert segmenter.settings == before and segmenter.pipeline.settings.attn_max_batch == "auto"
