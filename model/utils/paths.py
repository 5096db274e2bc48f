"""Default folder and file names of caches and outputs (SPEC §12.1–§12.3).

These names are what the reference's run scripts produced, so existing folder trees and the evaluation scripts
keep working. Every default is overridable (``--attn_save_path``, ``--vis_save_path``).
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_THRESHOLD = 0.8
#: which levels enter Φ (SPEC §6.7, paper Table 4b); every mode but "both" names its outputs' folder suffix
FUSION_MODES = ("both", "video", "frame")
#: the repository checkout (scripts, assets) this package runs from
REPO = Path(__file__).resolve().parents[2]
#: the eight-frame clip kept in the repository (assets/README.md): the self-test's and the web demo's example
SAMPLE_CLIP = Path("assets/sample_clip")


def data_name(dataset: str, testset: bool = False) -> str:
    """``<dataset>_valid``, or ``mevis_valid_u`` / ``mevis_valid`` (§12.2)."""
    if dataset == "mevis":
        return "mevis_valid" if testset else "mevis_valid_u"
    return f"{dataset}_valid"


def prompt_suffix(obj_ver: int, bg_ver: int, choice_ver: int) -> str:
    """``_p<obj><bg><cnt>`` when any prompt version is non-zero (§12.2)."""
    return f"_p{obj_ver}{bg_ver}{choice_ver}" if (obj_ver or bg_ver or choice_ver) else ""


def run_folder(num_input_frames: int, layer_start: int, layer_end_arg: int,
               prompt_versions: tuple[int, int, int] = (0, 0, 0), obj_only: bool = False) -> str:
    """``F<N>_L<start>-<end>[_p…][_obj-only]``; ``end`` is the flag as given (−1 → ``F16_L14--1``)."""
    name = f"F{num_input_frames}_L{layer_start}-{layer_end_arg}{prompt_suffix(*prompt_versions)}"
    return name + ("_obj-only" if obj_only else "")


def cache_folder(model_name: str, run: str, dataset: str, testset: bool = False,
                 root: str | Path = "attn_weights") -> Path:
    """``attn_weights/<MODEL_NAME>/<run folder>/<DATA_NAME>/`` (§12.2)."""
    return Path(root) / model_name / run / data_name(dataset, testset)


def cache_file_name(vid_name: str, exp_id: str) -> str:
    """``<vid_name>_<exp_id>.safetensors`` (§12.2); ReVOS uses the numeric ``vid_id`` as ``vid_name``."""
    return f"{vid_name}_{exp_id}.safetensors"


def output_kind(kind: str, point_threshold: float = DEFAULT_THRESHOLD,
                final_score_threshold: float = DEFAULT_THRESHOLD, no_background: bool = False,
                fusion: str = "both", always_threshold_suffix: bool = False) -> str:
    """``<kind>`` plus the suffixes of non-default settings (§12.3).

    ``kind`` is ``attn-mask``, ``sam-mask`` or ``keypoint``. The threshold suffix applies to SAM masks only; the
    threshold grid (§13.5) sets ``always_threshold_suffix`` so that its 0.80/0.80 cell is named like the others.
    """
    name = kind
    non_default = point_threshold != DEFAULT_THRESHOLD or final_score_threshold != DEFAULT_THRESHOLD
    if kind == "sam-mask" and (non_default or always_threshold_suffix):
        name += f"_trk-thr-{final_score_threshold:.2f}-point-thr-{point_threshold:.2f}"
    if no_background:
        name += "_obj-only"
    if fusion != "both":
        name += f"_{fusion}-only"
    return name


def output_folder(model_name: str, run: str, num_input_frames: int, kind: str, dataset: str,
                  testset: bool = False, root: str | Path = "outputs") -> Path:
    """``outputs/<MODEL_NAME>/<run folder>/inf-uniform-F<N>-<kind>/<DATA_NAME>/`` (§12.3)."""
    return Path(root) / model_name / run / f"inf-uniform-F{num_input_frames}-{kind}" / data_name(dataset, testset)


def metrics_path(pred_path: str | Path) -> Path:
    """The prediction folder with its ``outputs`` component replaced by ``metrics`` (§11.8, §12.4).

    Without an ``outputs`` component the result sits next to the prediction folder, as in the reference.
    The caller appends ``.json`` / ``.csv`` / ``.failures.json``.
    """
    path = Path(pred_path)
    parts = list(path.parts)
    if "outputs" in parts:
        idx = len(parts) - 1 - parts[::-1].index("outputs")
        parts[idx] = "metrics"
        return Path(*parts)
    return path
