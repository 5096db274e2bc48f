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
from model.selftest.tiny.preset import DISCLAIMER, TINY_PRECISION, TINY_SETTINGS, tiny_layout
from model.settings import DEFAULT_MLLM, LIVE_ATTN_MAX_BATCH, SegmentSettings, add_settings
from model.utils.errors import run_cli, set_interrupt_note

#: the demo's flags, from the settings registry (model/settings.py): one video, both models, every method setting
DEMO_FLAGS = ("video_path", "exp", "vis_save_path", "save_per_frame", "save_video", "save_masks", "version",
              "vision_pretrained", "vision_pretrained_config", "precision", "attn_implementation", "image_processor",
              "device", "sam2_overrides", *SegmentSettings.field_names(), "web", "tiny", "tiny_ckpts")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag; the description (with its example) as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    add_settings(parser, DEMO_FLAGS, {
        "vis_save_path": {"default": "./results/decaf_demo/",
                          "help": "output folder; the overview is <vis_save_path>/<video name>_all.png"},
        "version": {"default": DEFAULT_MLLM},
        "attn_max_batch": {"default": LIVE_ATTN_MAX_BATCH},  # one video at a time: more memory is free
    })
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

    settings = SegmentSettings.from_args(args)
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
