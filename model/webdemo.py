"""DecAF web demo: a local Gradio page that segments what an expression refers to in an uploaded clip (SPEC §1.5).

Example:
    python -m model.webdemo --version ckpts/Qwen2.5-VL-7B-Instruct      # then open http://127.0.0.1:7860
    python -m model.webdemo --tiny                                      # tiny random weights, offline, on CPU

The MLLM and SAM2 load once at start-up (the same checkpoint and method flags as demo.py) and stay loaded; requests
queue and run one at a time, with the progress of each stage in the page. The page takes a video file (MP4, WebM,
MOV, …) or a ZIP of JPEG frames, or the path of a frame folder or video file on this machine, and an expression,
and shows the SAM2 overlay video, the sampled frames with the fused map Φ, the coarse mask and the SAM2 prompt
points, the MLLM's answers, the time of each stage and a ZIP of the mask PNGs. The server listens on 127.0.0.1 only
unless --host says otherwise, never opens a share link and sends no analytics. Needs the ``web`` extra
(``pip install -e ".[web]"``).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import cv2

from model.api import Segmenter, SegmentSettings, VideoSource
from model.settings import add_settings, batch_arg
from model.utils.errors import DecafError, run_cli
from model.utils.paths import REPO, SAMPLE_CLIP
from model.utils.video import check_frame_sizes
from model.vis.web_outputs import browser_codec, write_gallery, write_mask_zip, write_overlay_video

log = logging.getLogger("decaf.webdemo")

#: largest single frame accepted from a ZIP (a guard against archives that inflate without bound)
MAX_ZIP_MEMBER_BYTES = 64 * 2 ** 20
UPLOAD_TYPES = [".mp4", ".webm", ".mov", ".mkv", ".avi", ".zip"]
#: the CLI demo's input/output flags: the page takes the clip and the expression, and offers the outputs
CLI_ONLY_FLAGS = ("video_path", "exp", "vis_save_path", "save_per_frame", "save_video", "save_masks", "web")
#: reading the clip, stage 1, fusion and coarse masks, SAM2, writing the outputs
STAGE_COUNT = 5
KEPT_REQUESTS = 2  # request folders kept on disk; Gradio serves copies from its own cache
EXAMPLE_EXPRESSION = "the girl jumping on the bed"
TINY_BANNER = ("<b>Tiny random-weight checkpoints (--tiny)</b>: random weights give meaningless masks and "
               "answers; this page only shows that the install and the pipeline work.")
CSS = """
#tiny-banner {background: #fff4ce; border: 1px solid #e0b000; border-radius: 8px; padding: 10px 14px;
              color: #5c4400; font-size: 15px;}
#status {min-height: 2.5em;}
#status .decaf-error {color: #b00020; font-weight: 600;}
#status .decaf-done {color: #116329; font-weight: 600;}
#status .decaf-warn {color: #8a5a00;}
footer {display: none !important;}
"""


# --------------------------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    """demo.py's model, method and testing flags (its parser, reused), without its input/output flags, plus the
    server's own."""
    try:
        import demo  # the repository's demo.py, beside the model package
    except ImportError as exc:
        raise DecafError("demo.py not found: run the web demo from a DecAF repository checkout") from exc
    base = demo.build_parser()
    for action in base._actions:  # argparse has no public way to leave out a parent's flags
        if action.dest in CLI_ONLY_FLAGS:
            action.required = False
            action.help = argparse.SUPPRESS
    parser = argparse.ArgumentParser(prog="python -m model.webdemo", description=__doc__, parents=[base],
                                     add_help=False, formatter_class=base.formatter_class)
    # --max_frames bounds memory: SAM2 keeps ~16 MiB of image features per frame at 1024 px
    add_settings(parser, ("host", "port", "max_frames"))
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The CLI demo's parsing (``--tiny`` makes the tiny checkpoints and settings the defaults), then the page's
    own checks."""
    import demo

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = demo.parse_args(argv, parser)
    given = [name for name in CLI_ONLY_FLAGS if getattr(args, name) != parser.get_default(name)]
    if given:
        parser.error(f"--{given[0]} belongs to the CLI demo (demo.py); the page takes the clip and the expression")
    if args.max_frames < 1:
        parser.error(f"--max_frames must be positive, got {args.max_frames}")
    return args


# --------------------------------------------------------------------------------------------------- inputs
def extract_frames_zip(archive_path: Path, folder: Path, max_frames: int) -> Path:
    """The ``.jpg``/``.jpeg`` members of a ZIP, flattened into ``folder`` as ``<stem>.jpg`` (SPEC §2.2 names).

    Only base names reach the file system (no member path can escape ``folder``); hidden files and macOS
    resource forks are skipped.
    """
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DecafError(f"{archive_path.name} is not a readable ZIP file ({exc}); zip a folder of JPEG frames")
    with archive:
        members = [member for member in archive.infolist()
                   if not member.is_dir() and PurePosixPath(member.filename).suffix.lower() in (".jpg", ".jpeg")
                   and not PurePosixPath(member.filename).name.startswith(".")
                   and "__MACOSX" not in PurePosixPath(member.filename).parts]
        if not members:
            raise DecafError(f"{archive_path.name} holds no .jpg frames; zip a folder of JPEG frames")
        if len(members) > max_frames:
            raise DecafError(f"{archive_path.name} holds {len(members)} frames, more than the {max_frames} this "
                             f"server accepts (--max_frames); cut the clip")
        names = [PurePosixPath(member.filename).stem + ".jpg" for member in members]
        if len(set(names)) != len(names):
            raise DecafError(f"{archive_path.name} holds two frames of one name in different folders; zip one "
                             f"folder of frames")
        folder.mkdir(parents=True)
        for member, name in zip(members, names):
            if member.file_size > MAX_ZIP_MEMBER_BYTES:
                raise DecafError(f"{member.filename} in {archive_path.name} inflates to {member.file_size} bytes; "
                                 f"is it a JPEG frame?")
            try:
                (folder / name).write_bytes(archive.read(member))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DecafError(f"cannot extract {member.filename} from {archive_path.name}: {exc}") from exc
    return folder


def count_estimate(video: Path) -> int:
    """The frame count a video container states (0 when unknown); checked before the whole file is decoded."""
    capture = cv2.VideoCapture(str(video))
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0) if capture.isOpened() else 0
    finally:
        capture.release()


def open_input(upload: str | None, path_text: str, scratch: Path, max_frames: int) -> VideoSource:
    """The clip of a request: an uploaded video file or ZIP, else a frame folder or video file path on the server.

    Refuses clips longer than ``max_frames`` and frames of mixed sizes (SPEC §2.4) before any model runs.
    """
    if upload:
        given = Path(upload)
        if given.suffix.lower() == ".zip":
            given = extract_frames_zip(given, scratch / given.stem, max_frames)
    elif path_text.strip():
        given = Path(path_text.strip()).expanduser()
        if not given.exists():
            raise DecafError(f"{given} does not exist on the server; give a frame folder or a video file")
    else:
        raise DecafError("no video: upload a video file or a ZIP of JPEG frames, or type a frame folder path")
    if given.is_file() and count_estimate(given) > max_frames:
        raise DecafError(f"{given.name} has about {count_estimate(given)} frames, more than the {max_frames} this "
                         f"server accepts (--max_frames); cut the clip")
    source = VideoSource.open(given)
    try:
        if len(source.frames) > max_frames:
            raise DecafError(f"{source.name} has {len(source.frames)} frames, more than the {max_frames} this server "
                             f"accepts (--max_frames); cut the clip")
        check_frame_sizes(source.frames)
    except BaseException:
        source.close()
        raise
    return source


# --------------------------------------------------------------------------------------------------- request
@dataclass
class Outputs:
    """What one request shows; on an error only the status is set, so nothing half-written is offered."""

    status: str
    video: str | None = None
    gallery: list[tuple[str, str]] | None = None
    answers: dict[str, Any] | None = None
    timings: str = ""
    masks: str | None = None

    def values(self) -> tuple:
        return self.status, self.video, self.gallery, self.answers, self.timings, self.masks


def status_html(kind: str, text: str) -> str:
    import html

    return f'<p class="decaf-{kind}">{html.escape(text)}</p>'


def timings_table(timings: dict[str, float]) -> str:
    rows = "\n".join(f"| {stage} | {seconds:.2f} |" for stage, seconds in timings.items())
    return f"| stage | seconds |\n|---|---:|\n{rows}"


class _StageProgress(logging.Handler):
    """The page's progress: stage n of :data:`STAGE_COUNT`, named. The web demo reports reading the clip and
    writing the outputs; the three stages between are the ones :class:`Segmenter` logs as starting ('stage 1: MLLM
    calls …', 'fusion and coarse masks …', 'SAM2 on … frames …'). With ``track_tqdm`` the stages' own tqdm bars
    (MLLM passes, SAM2 propagation) appear under it."""

    def __init__(self, progress: Any):
        super().__init__(logging.INFO)
        self.progress = progress
        self.done = 0

    def stage(self, description: str) -> None:
        if self.progress is not None:
            self.progress((self.done, STAGE_COUNT), desc=description, unit="stages")
        self.done += 1

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.endswith(" …"):
            self.stage(message[:-2])


class WebDemo:
    """The loaded models and the request handler behind the page."""

    def __init__(self, segmenter: Segmenter, workdir: Path, max_frames: int, tiny: bool):
        self.segmenter = segmenter
        self.workdir = workdir
        self.max_frames = max_frames
        self.tiny = tiny
        self._numbers = itertools.count(1)

    def _new_request_folder(self) -> Path:
        root = self.workdir / "requests"
        root.mkdir(exist_ok=True)
        earlier = sorted(root.iterdir())
        for old in earlier[:max(len(earlier) - (KEPT_REQUESTS - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        folder = root / f"{next(self._numbers):06d}"
        folder.mkdir()
        return folder

    def run(self, upload: str | None, path_text: str, expression: str, num_input_frames: float,
            point_threshold: float, final_score_threshold: float, attn_max_batch: str,
            progress: Any = None) -> tuple:
        """One request; every user error becomes a message in the page (the server keeps serving)."""
        started = time.perf_counter()
        folder = self._new_request_folder()
        stages = _StageProgress(progress)
        api_log = logging.getLogger("decaf.api")
        api_log.addHandler(stages)
        try:
            outputs = self._run(folder, upload, path_text or "", expression or "", num_input_frames, point_threshold,
                                final_score_threshold, attn_max_batch, stages, started)
        except DecafError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            outputs = Outputs(status_html("error", f"Error: {exc}"))
        except Exception as exc:  # noqa: BLE001 - the page must survive any failure of one request
            shutil.rmtree(folder, ignore_errors=True)
            log.error("request failed:\n%s", traceback.format_exc())
            hint = ""
            if "out of memory" in str(exc).lower():
                hint = "; try fewer sampled frames, a smaller attn_max_batch or a shorter clip"
            outputs = Outputs(status_html("error", f"Internal error: {type(exc).__name__}: {exc}{hint}"))
        finally:
            api_log.removeHandler(stages)
        # the request number tells a script driving the page which request the status belongs to
        outputs.status = f'<div data-request="{int(folder.name)}">{outputs.status}</div>'
        return outputs.values()

    def _run(self, folder: Path, upload: str | None, path_text: str, expression: str, num_input_frames: float,
             point_threshold: float, final_score_threshold: float, attn_max_batch: str,
             stages: _StageProgress, started: float) -> Outputs:
        if not expression.strip():
            raise DecafError("the expression is empty; type the object to segment, e.g. \"the dog\"")
        try:
            batch = batch_arg(str(attn_max_batch).strip())
        except argparse.ArgumentTypeError as exc:
            raise DecafError(f"attn_max_batch: {exc}") from exc
        if int(num_input_frames) != num_input_frames:
            raise DecafError(f"the number of sampled frames must be a whole number, got {num_input_frames}")
        self.segmenter.update_settings(num_input_frames=int(num_input_frames), attn_max_batch=batch,
                                       point_threshold=float(point_threshold),
                                       final_score_threshold=float(final_score_threshold))
        stages.stage("reading the clip")
        read_started = time.perf_counter()
        source = open_input(upload, path_text, folder / "frames", self.max_frames)
        try:
            read_seconds = time.perf_counter() - read_started
            result = self.segmenter.segment(source, expression)
            stages.stage("writing the overlay video, gallery and masks")
            write_started = time.perf_counter()
            out = folder / "outputs"
            video = write_overlay_video(result, out)
            gallery = write_gallery(result, out / "gallery")
            masks = write_mask_zip(result, out / f"{result.source.name}_masks.zip")
            write_seconds = time.perf_counter() - write_started
        finally:
            source.close()
            shutil.rmtree(folder / "frames", ignore_errors=True)
        timings = {"reading the clip": read_seconds, "stage 1 (MLLM calls)": result.timings["stage1"],
                   "fusion and coarse masks": result.timings["fusion"], "SAM2": result.timings["sam2"],
                   "writing outputs": write_seconds, "total": time.perf_counter() - started}
        texts = result.texts
        answers = {"obj_name": texts.get("obj_name"), "obj_cls_video": texts.get("obj_cls_video"),
                   "obj_cls_frame": texts.get("obj_cls_frame"),
                   **{key: value for key, value in texts.items() if key.startswith("bg_caption") and value},
                   "tracklets": {"after NMS": result.num_tracklets, "selected": result.selected_tracklets}}
        done = (f"Done: {len(result.frame_paths)} frames, {len(result.key_frame_indices)} sampled, object "
                f"{texts.get('obj_name') or texts.get('obj_cls_video')!r}, in {timings['total']:.1f} s.")
        status = status_html("done", done) + "".join(status_html("warn", f"Note: {note}")
                                                     for note in result.degenerate)
        return Outputs(status, str(video), [(str(path), caption) for path, caption in gallery], answers,
                       timings_table(timings), str(masks))


# ------------------------------------------------------------------------------------------------------ page
def build_page(app: WebDemo, defaults: SegmentSettings) -> Any:
    """The Gradio Blocks of the page; knob defaults are the server's settings (the paper's unless changed)."""
    import gradio as gr

    with gr.Blocks(title="DecAF web demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# DecAF: segment what an expression refers to\nTraining-free video segmentation from "
                    "decomposed MLLM attention (fused attention maps → coarse masks → SAM2 point prompts).")
        if app.tiny:
            gr.HTML(f'<div id="tiny-banner">⚠️ {TINY_BANNER}</div>')
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Video file (MP4, WebM, MOV) or ZIP of JPEG frames", file_types=UPLOAD_TYPES,
                                 type="filepath", elem_id="upload")
                path_text = gr.Textbox(label="…or a frame folder / video path on the server", elem_id="path",
                                       placeholder=str(SAMPLE_CLIP))
                expression = gr.Textbox(label="Expression or question", elem_id="expression",
                                        placeholder="e.g. the girl jumping on the bed")
                with gr.Accordion("Settings (paper defaults)", open=False):
                    frames = gr.Slider(1, 64, step=1, value=defaults.num_input_frames, label="sampled frames N",
                                       elem_id="num-frames")
                    point = gr.Slider(0.0, 1.0, step=0.01, value=defaults.point_threshold,
                                      label="point threshold τ_pq (inclusive)")
                    final = gr.Slider(0.0, 1.0, step=0.01, value=defaults.final_score_threshold,
                                      label="tracklet score threshold τ_trk (strict)")
                    batch = gr.Textbox(value=str(defaults.attn_max_batch), label="attn_max_batch (memory only; "
                                       "an integer or 'auto')")
                run = gr.Button("Segment", variant="primary", elem_id="run")
                gr.Examples([[str(REPO / SAMPLE_CLIP), EXAMPLE_EXPRESSION]], [path_text, expression],
                            label="Example: the bundled sample clip (click, then Segment)")
            with gr.Column(scale=3):
                status = gr.HTML(elem_id="status")
                video = gr.Video(label="SAM2 masks on every frame", elem_id="overlay-video", interactive=False,
                                 loop=True, autoplay=True)
                with gr.Row():
                    answers = gr.JSON(label="MLLM answers", elem_id="answers")
                    timings = gr.Markdown(elem_id="timings")
                masks = gr.File(label="Mask PNGs (ZIP)", elem_id="masks-zip", interactive=False)
        gallery = gr.Gallery(label="Sampled frames: fused map Φ · coarse mask · prompt points · SAM2 mask",
                             columns=4, height="auto", object_fit="contain", elem_id="gallery", interactive=False)

        def handle(upload_value: str | None, path_value: str, expression_value: str, frames_value: float,
                   point_value: float, final_value: float, batch_value: str,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
            return app.run(upload_value, path_value, expression_value, frames_value, point_value, final_value,
                           batch_value, progress)

        inputs = [upload, path_text, expression, frames, point, final, batch]
        outputs = [status, video, gallery, answers, timings, masks]
        run.click(handle, inputs, outputs, concurrency_limit=1)
        expression.submit(handle, inputs, outputs, concurrency_limit=1)
    return page


# ------------------------------------------------------------------------------------------------------ main
def check_port_free(host: str, port: int) -> None:
    """Fail before the models load when the server could not listen on ``host:port``."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DecafError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from exc


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Load the models, then serve the page until interrupted (Ctrl-C or SIGTERM)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import gradio as gr
    except ImportError as exc:
        raise DecafError("the web demo needs Gradio: pip install -e \".[web]\"") from exc
    started = time.perf_counter()
    check_port_free(args.host, args.port)
    codec = browser_codec()  # fails now, not at the first request, where OpenCV writes no browser video
    workdir = Path(tempfile.mkdtemp(prefix="decaf-webdemo-"))
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    try:
        import demo

        demo.prepare_tiny(args)  # builds the tiny checkpoints into --tiny_ckpts on first use
        version, sam2, sam2_config, overrides = (args.version, args.vision_pretrained,
                                                 args.vision_pretrained_config, args.sam2_overrides)
        settings = SegmentSettings.from_args(args)
        with Segmenter(version, sam2, sam2_config, settings=settings, device=args.device, precision=args.precision,
                       attn_implementation=args.attn_implementation, sam2_overrides=overrides,
                       progress=True) as segmenter:
            app = WebDemo(segmenter, workdir, args.max_frames, args.tiny)
            page = build_page(app, settings)
            page.queue(default_concurrency_limit=1, max_size=16)
            # SIGTERM ends the server as Ctrl-C does, so the temporary folder is removed
            signal.signal(signal.SIGTERM, _interrupt)
            _, url, _ = page.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                                    mcp_server=False, prevent_thread_lock=True, quiet=True, show_error=True,
                                    allowed_paths=[str(workdir)], css=CSS, footer_links=[],
                                    theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                                            font_mono=["ui-monospace", "monospace"]))
            print(f"DecAF web demo ready at {url} (start-up {time.perf_counter() - started:.1f} s; overlay video "
                  f"{codec.fourcc}{codec.suffix}; max {args.max_frames} frames per clip)", flush=True)
            page.block_thread()
            page.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
