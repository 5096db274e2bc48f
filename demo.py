"""DecAF demo: segment what an expression refers to in one video, live, and save a visualisation (SPEC §1.5, §12.5).

Examples:
    python demo.py --tiny --video_path assets/sample_clip --exp "the bed"      # offline, tiny random weights
    python demo.py --video_path assets/sample_clip --exp "the bed" --save_per_frame --save_video

Runs the five MLLM calls (no cache file), fusion, coarse masks and SAM2 prompting on the video, then writes
``{vis_save_path}/{vid_name}_all.png`` and, as asked, per-frame images, an MP4 and the mask PNGs
(``{vis_save_path}/{vid_name}/masks/``). ``--video_path`` is a folder of .jpg frames or a video file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

# only light modules before the arguments are parsed: --help and a bad flag answer at once, before torch loads
from model.cli_args import add_image_processor_arg, batch_arg, layer_start_arg, positive_int, prompt_version_arg
from model.selftest.tiny.preset import DEFAULT_TINY_CKPTS, DISCLAIMER, TINY_PRECISION, TINY_SETTINGS, tiny_layout
from model.settings import DEFAULT_MLLM, DEFAULT_SAM2_CHECKPOINT, DEFAULT_SAM2_CONFIG, SegmentSettings
from model.utils.errors import run_cli, set_interrupt_note

DEFAULTS = SegmentSettings()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag; the description (with its example) as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--video_path", required=True,
                    help="a folder of .jpg frames (sorted by name) or a video file (MP4 etc., decoded with OpenCV)")
    io.add_argument("--exp", required=True,
                    help="the referring expression or question; surrounding whitespace is stripped, and '.' is "
                         "appended unless it ends with '?' or '.' (SPEC §2.1)")
    io.add_argument("--vis_save_path", default="./results/decaf_demo/",
                    help="output folder; the overview is <vis_save_path>/<video name>_all.png")
    io.add_argument("--save_per_frame", action="store_true",
                    help="also write half-size per-frame images to <vis_save_path>/<video name>/{img, attn_map, "
                         "coarse_mask, points} (sampled frames) and sam_mask (every frame)")
    io.add_argument("--save_video", action="store_true",
                    help="also write <vis_save_path>/<video name>_sam_mask.mp4: every frame with its SAM2 mask, at "
                         "the source frame rate of a video file, else 10 fps")
    io.add_argument("--save_masks", action=argparse.BooleanOptionalAction, default=True,
                    help="write the SAM2 mask of every frame as a 0/255 PNG to <vis_save_path>/<video name>/masks/")

    models = parser.add_argument_group("models")
    models.add_argument("--version", default=DEFAULT_MLLM,
                        help="MLLM checkpoint folder of any supported family (read from its config.json); see "
                             "ckpts/README.md")
    models.add_argument("--vision_pretrained", default=DEFAULT_SAM2_CHECKPOINT, help="SAM2 checkpoint file")
    models.add_argument("--vision_pretrained_config", default=DEFAULT_SAM2_CONFIG,
                        help="SAM2 config name (SAM 2.0 Hiera-L by default, SPEC §8.1)")
    models.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="MLLM weight and forward dtype (AWQ checkpoints force fp16); attention maps are "
                             "always fp32 and SAM2 always runs in fp32")
    models.add_argument("--attn_implementation", choices=("sdpa", "flash_attention_2"), default=None,
                        help="kernel of the MLLM's own forward (default: flash_attention_2 if installed, else sdpa)")
    models.add_argument("--device", default=None, help="torch device of both models (default: cuda if available, "
                                                       "else cpu)")

    add_image_processor_arg(models)

    attention = parser.add_argument_group("attention (stage 1, SPEC §13.2)")
    attention.add_argument("--num_input_frames", type=int, default=DEFAULTS.num_input_frames,
                           help="N, frames sampled uniformly from the video for the MLLM (SPEC §2.3)")
    attention.add_argument("--attn_layer_idx_start", type=layer_start_arg, default=DEFAULTS.attn_layer_idx_start,
                           help="first rollout layer, inclusive; 'auto' = half the LLM depth (SPEC §5.1)")
    attention.add_argument("--attn_layer_idx_end", type=int, default=DEFAULTS.attn_layer_idx_end,
                           help="rollout end layer, exclusive; <= 0 means the last layer")
    attention.add_argument("--attn_max_token", type=int, default=DEFAULTS.attn_max_token,
                           help="Qwen families: merged visual tokens per video time slot (SPEC §3.1)")
    attention.add_argument("--attn_resize_scale", type=int, default=DEFAULTS.attn_resize_scale,
                           help="Qwen families: frame-level images are s× the video frame size per side")
    attention.add_argument("--attn_max_token_per_image", type=int, default=DEFAULTS.attn_max_token_per_image,
                           help="Qwen families: if > 0, frame-level images keep their aspect ratio with this token "
                                "budget instead of the s× rule")
    attention.add_argument("--max_patches", type=int, default=DEFAULTS.max_patches,
                           help="InternVL: maximum number of 448-px tiles per frame (SPEC §3.3)")
    attention.add_argument("--attn_max_batch", type=batch_arg, default=DEFAULTS.attn_max_batch,
                           help="frame-level conversations per forward pass; only memory changes. 'auto' starts "
                                "with all frames and halves the chunk on CUDA out-of-memory")
    attention.add_argument("--prompt_obj_ver", type=prompt_version_arg, default=DEFAULTS.prompt_obj_ver,
                           help="object-class prompt version 0-3 (paper Table 10; SPEC §4.3)")
    attention.add_argument("--prompt_bg_ver", type=prompt_version_arg, default=DEFAULTS.prompt_bg_ver,
                           help="background prompt version 0-3 (paper Table 11)")
    attention.add_argument("--prompt_obj_cnt_ver", type=prompt_version_arg, default=DEFAULTS.prompt_obj_cnt_ver,
                           help="object-choice prompt version 0-3 (paper Table 12)")

    sam = parser.add_argument_group("SAM2 prompting (SPEC §8)")
    sam.add_argument("--point_threshold", type=float, default=DEFAULTS.point_threshold,
                     help="τ_pq: cells of the fused map with value >= this become SAM2 point prompts (inclusive)")
    sam.add_argument("--final_score_threshold", type=float, default=DEFAULTS.final_score_threshold,
                     help="τ_trk: tracklets whose final score is > this value prompt the whole video (strict)")
    sam.add_argument("--sam2_batch", type=positive_int, default=DEFAULTS.sam2_batch, metavar="N",
                     help="SAM2 objects run as one batch, N at a time; 1 (default) is the per-object computation. "
                          "Larger N is faster but not bit-identical (a boundary pixel can flip)")

    web = parser.add_argument_group("web demo")
    web.add_argument("--web", action="store_true",
                     help="start the interactive web demo (Gradio, pip install -e \".[web]\") on a local port "
                          "instead; it takes the model and method flags below, see python -m model.webdemo --help")

    tiny = parser.add_argument_group("trying it offline")
    tiny.add_argument("--tiny", action="store_true",
                      help="use tiny random-weight checkpoints of the real classes (built into --tiny_ckpts on first "
                           f"use) with settings that finish in about a minute on a CPU: {TINY_SETTINGS}, "
                           f"--precision {TINY_PRECISION}. Flags given explicitly still win. {DISCLAIMER}")
    tiny.add_argument("--tiny_ckpts", default=str(DEFAULT_TINY_CKPTS),
                      help="folder of the tiny checkpoints for --tiny (written by `python -m model.selftest "
                           "--make_ckpts DIR`, or on first use)")

    testing = parser.add_argument_group("testing knobs (not needed for real checkpoints)")
    testing.add_argument("--sam2_overrides", nargs="*", default=[], metavar="OVERRIDE",
                         help="extra Hydra overrides for building SAM2, e.g. '++model.image_size=256' to load the "
                              "self-test's tiny checkpoint")
    testing.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens,
                         help="greedy answer length (SPEC §4.7: 128); lower only for random-weight smoke tests")
    return parser


def parse_args(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the flags; with ``--tiny`` the tiny checkpoints and settings become the defaults, so explicit flags
    still win (the checkpoints are built later, by :func:`prepare_tiny`, once every other check passed)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        tiny = tiny_layout(args.tiny_ckpts)
        parser.set_defaults(version=str(tiny.version), vision_pretrained=str(tiny.vision_pretrained),
                            vision_pretrained_config=tiny.vision_pretrained_config,
                            sam2_overrides=list(tiny.sam2_overrides), precision=TINY_PRECISION, **TINY_SETTINGS)
        args = parser.parse_args(argv)
    return args


def prepare_tiny(args: argparse.Namespace) -> None:
    """With ``--tiny``: build the tiny checkpoints if ``--tiny_ckpts`` holds none yet, and say what they are."""
    if args.tiny:
        from model.selftest.tiny.preset import ensure_tiny_checkpoints

        logging.getLogger("decaf.demo").warning("--tiny: %s", DISCLAIMER)
        ensure_tiny_checkpoints(args.tiny_ckpts)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--web" in argv:  # before parsing: the page takes the clip and the expression, so they are not required
        from model.webdemo import main as web_main

        return web_main([arg for arg in argv if arg != "--web"])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("decaf.demo")
    prepare_tiny(args)
    set_interrupt_note(lambda: "no output was left half-written (each appears only when complete); run the same "
                               "command again")
    from model.api import Segmenter, VideoSource, check_checkpoints, check_expression
    from model.sam.prompting import sam2_extension_loaded
    from model.utils.atomic import write_manifest
    from model.vis.visualize import save_outputs

    settings = SegmentSettings(**{name: getattr(args, name) for name in SegmentSettings.field_names()})
    # the expression, every frame and both checkpoints are checked before either model loads
    expression = check_expression(args.exp)
    check_checkpoints(args.version, args.vision_pretrained, args.vision_pretrained_config)
    source = VideoSource.open(args.video_path)
    try:
        frame_size = source.verify()
        log.info("video %s: %d frames of %dx%d", source.name, len(source.frames), frame_size[1], frame_size[0])
        with Segmenter(args.version, args.vision_pretrained, args.vision_pretrained_config, settings=settings,
                       device=args.device, precision=args.precision, attn_implementation=args.attn_implementation,
                       sam2_overrides=args.sam2_overrides, progress=True,
                       image_processor=args.image_processor) as segmenter:
            result = segmenter.segment(source, expression)
            log.info("writing outputs to %s", args.vis_save_path)
            outputs = save_outputs(result, args.vis_save_path, per_frame=args.save_per_frame,
                                   video=args.save_video, masks=args.save_masks)
            write_manifest(args.vis_save_path, "demo", vars(args),
                           resolved={"device": segmenter.device, "layer_range": list(segmenter.layer_range),
                                     "family": segmenter.adapter.family, "model_dtype": str(segmenter.adapter.dtype),
                                     "attn_implementation": segmenter.adapter.attn_implementation,
                                     "image_processor": segmenter.adapter.settings()["image_processor"],
                                     "video_name": result.source.name,
                                     "frames": len(result.frame_paths), "fps": result.source.fps,
                                     "key_frame_indices": result.key_frame_indices},
                           sam2_extension_loaded=sam2_extension_loaded(), texts=result.texts,
                           degenerate=result.degenerate, empty_sam2_mask=not result.masks.any(),
                           random_weights=args.tiny, timings=result.timings,
                           outputs={name: str(path) for name, path in outputs.items()})
    finally:
        source.close()
    print(f"object: {result.texts.get('obj_name') or result.texts.get('obj_cls_video')!r}; "
          f"{len(result.frame_paths)} frames, {len(result.key_frame_indices)} sampled"
          + ("; SAM2 found no object (empty mask)" if not result.masks.any() else ""))
    for name, path in outputs.items():
        print(f"{name}: {path}")
    if args.tiny:
        print(f"note: {DISCLAIMER}")
    return 0


if __name__ == "__main__":
    run_cli(main)
