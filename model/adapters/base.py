"""The adapter contract between one MLLM family and the shared capture engine and prompting pipeline (SPEC §3.0).

An adapter (i) builds model inputs for one video-level sequence, for a batch of single-image frame-level
sequences and for a text-only sequence; (ii) returns for every batch row the exact visual-token positions V and the
map grid, and reshapes a row's visual values into a (t, h, w) map (§6.1); (iii) names the LLM decoder layers to
capture. Everything family-independent — checking and loading a checkpoint, chat rendering, decoding — lives here
once; a family module only adds what differs.
"""
from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from model.adapters.options import AdapterOptions
from model.utils.errors import DecafError, SettingError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
CKPT_HELP = "see ckpts/README.md for where to put checkpoints"
#: BPE ranks of the Qwen2 vocabulary behind every paper checkpoint; a larger tokenizer is the real one, whose
#: special-token ids SPEC §3 lists
QWEN2_BPE_RANKS = 151_643
#: ``--image_processor`` choice → transformers ≥ 5 image-processor backend. Under transformers 5 the plain class
#: names (``Qwen2VLImageProcessor``, ``LlavaOnevisionImageProcessor``, ``GotOcr2ImageProcessor``) are the
#: torchvision ("fast") processors and the PIL ("slow") ones end in ``Pil``; ``AutoImageProcessor`` picks
#: torchvision whenever it is installed unless ``backend=`` says otherwise.
IMAGE_PROCESSOR_BACKENDS = {"slow": "pil", "fast": "torchvision"}


@dataclass
class VisualBatch:
    """Inputs of one forward pass plus what the rollout and the reshape need (SPEC §3.0 ii)."""

    inputs: dict[str, Any]
    visual_mask: torch.Tensor  # (B, L) bool: the exact visual-token positions V of each row
    key_mask: torch.Tensor  # (B, L) bool: True for real tokens (False = padding)
    grid: tuple[int, int, int]  # map grid (t, h, w) of every row
    tiling: tuple[int, int] | None = None  # (rows, cols) of tiles for tiled frame inputs (InternVL)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.visual_mask.shape[1])


def read_checkpoint_config(checkpoint: str | Path) -> dict[str, Any]:
    """``config.json`` of a local checkpoint folder, with one-line errors for a missing or broken folder."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise DecafError(f"checkpoint folder not found: {root} ({CKPT_HELP})")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise DecafError(f"checkpoint {root} has no config.json; is it a complete Hugging Face checkpoint? ({CKPT_HELP})")
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DecafError(f"cannot read {config_file}: {exc}") from exc


def check_checkpoint_files(checkpoint: str | Path) -> None:
    """Fail before any job starts when weights, processor or tokenizer files are missing (one line each)."""
    root = Path(checkpoint)
    if not any(next(root.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise DecafError(f"checkpoint {root} has no weight files (*.safetensors or *.bin); the download looks "
                         f"incomplete ({CKPT_HELP})")
    if not any((root / name).is_file() for name in PROCESSOR_FILES):
        raise DecafError(f"checkpoint {root} has no processor config ({' / '.join(PROCESSOR_FILES)}); "
                         f"download the processor files too ({CKPT_HELP})")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise DecafError(f"checkpoint {root} has no tokenizer files; download them too ({CKPT_HELP})")


def layer_count(config: dict[str, Any]) -> int:
    """Number of LLM decoder layers from a checkpoint config (text config for VLMs) [ckpt]."""
    for key in ("text_config", "llm_config"):
        if isinstance(config.get(key), dict) and "num_hidden_layers" in config[key]:
            return int(config[key]["num_hidden_layers"])
    if "num_hidden_layers" in config:
        return int(config["num_hidden_layers"])
    raise DecafError("cannot find num_hidden_layers in the checkpoint config")


def resolve_layer_range(num_layers: int, start: int | str, end: int) -> tuple[int, int]:
    """SPEC §5.1: start ``auto`` = ⌊N_layers/2⌋; end ≤ 0 means N_layers (exclusive)."""
    resolved_start = num_layers // 2 if start == "auto" else int(start)
    resolved_end = num_layers if end <= 0 else int(end)
    if not 0 <= resolved_start < resolved_end <= num_layers:
        raise DecafError(f"layer range [{resolved_start}, {resolved_end}) is outside the model's {num_layers} layers")
    return resolved_start, resolved_end


BACKEND_LABELS = {"pil": "PIL", "torchvision": "torchvision"}


def image_processor_backend_of(image_processor: Any) -> str:
    """``pil`` or ``torchvision``: which transformers ≥ 5 backend class an image processor is."""
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    if isinstance(image_processor, TorchvisionBackend):
        return "torchvision"
    if isinstance(image_processor, PilBackend):
        return "pil"
    raise DecafError(f"image processor {type(image_processor).__name__} is neither a PIL nor a torchvision "
                     "backend of transformers ≥ 5")


def load_rgb(path: str | Path) -> Image.Image:
    """Open a frame as RGB (§2.5); unreadable files become a :class:`DecafError` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise DecafError(f"cannot decode image {path}: {exc}") from exc


def has_real_qwen2_vocab(tokenizer: Any) -> bool:
    """True for the full Qwen2 vocabulary, where the paper checkpoints' token ids must hold (SPEC §0.3 [ckpt])."""
    return len(tokenizer) > QWEN2_BPE_RANKS


def expand_placeholder(text: str, placeholder: str, replacement: str) -> str:
    """Replace the one visual placeholder the chat template rendered by the adapter's own token run."""
    count = text.count(placeholder)
    if count != 1:
        # more than one: the expression itself contains the placeholder text, which would become visual tokens
        raise DecafError(f"the rendered prompt holds {count} {placeholder!r} placeholders instead of one; remove "
                         f"{placeholder!r} from the expression")
    return text.replace(placeholder, replacement)


def processor_size(processor: Any) -> tuple[int, int]:
    """(height, width) an image or video processor resizes to (its ``size``: a dict or a ``SizeDict``) [ckpt]."""
    size = processor.size
    return int(size["height"]), int(size["width"])


def default_attn_implementation() -> str:
    """flash-attention 2 when installed (the reference's kernel, §5.8d), else PyTorch sdpa."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2" if torch.cuda.is_available() else "sdpa"


class MLLMAdapter(ABC):
    """One MLLM family. Subclasses set the class variables and implement the three input builders."""

    family: ClassVar[str]  # as recorded in caches (§12.2)
    model_types: ClassVar[dict[str, str]]  # config model_type -> family name recorded in the cache
    #: system message passed explicitly, or None to let the chat template insert its default (§4.4)
    system_message: ClassVar[str | None] = None
    #: ``--image_processor`` default: the one SPEC §3 names for the family (the paper reference's processor)
    default_image_processor: ClassVar[str]
    #: how the M-RoPE positions of video passes are made, recorded in the cache (§3.1); None: 1-D positions
    mrope_positions: ClassVar[str | None] = None
    #: whether the engine may compute the visual prefix once per video and continue each call after it (SPEC
    #: §5.8f); a family whose continued passes were not shown exact keeps it False
    shares_prefix: ClassVar[bool] = True

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu", precision: str = "bf16",
                 attn_implementation: str | None = None, image_processor: str | None = None,
                 options: AdapterOptions = AdapterOptions()):
        self.checkpoint = str(checkpoint)
        config = read_checkpoint_config(checkpoint)
        model_type = config.get("model_type")
        if model_type not in self.model_types:
            raise DecafError(f"checkpoint {checkpoint} is a {model_type!r} model, but this script handles "
                             f"{sorted(self.model_types)}; use the extraction script of its family")
        self.family = self.model_types[model_type]
        check_checkpoint_files(checkpoint)
        self.options = options
        self.device = torch.device(device)
        self.dtype = self._resolve_dtype(config, precision)
        self.attn_implementation = attn_implementation or default_attn_implementation()
        self.num_layers = layer_count(config)
        self.revision = config.get("_commit_hash")
        self.image_processor_choice = image_processor or self.default_image_processor
        self.image_processor_backend = self.resolve_image_processor(self.image_processor_choice)
        self.model = self._load_model(checkpoint, config)
        self.processor = self._load_processor(checkpoint)
        self.tokenizer = self.processor.tokenizer

    @classmethod
    def resolve_image_processor(cls, choice: str | None) -> str:
        """The transformers backend (``pil`` / ``torchvision``) of ``--image_processor`` (None: the family's)."""
        choice = cls.default_image_processor if choice is None else choice
        if choice not in IMAGE_PROCESSOR_BACKENDS:
            raise SettingError("image_processor", f"must be one of {sorted(IMAGE_PROCESSOR_BACKENDS)}, got {choice!r}")
        return IMAGE_PROCESSOR_BACKENDS[choice]

    @classmethod
    def matched_settings(cls, image_processor: str | None) -> dict[str, Any]:
        """Settings known before the model loads that a reusable cache must have been made with (§12.2): the image
        processor backend and, for M-RoPE families, the video position rule (§3.1)."""
        matched: dict[str, Any] = {"image_processor_backend": cls.resolve_image_processor(image_processor)}
        if cls.mrope_positions is not None:
            matched["mrope_positions"] = cls.mrope_positions
        return matched

    # ----- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_dtype(config: dict[str, Any], precision: str) -> torch.dtype:
        quant = (config.get("quantization_config") or {}).get("quant_method")
        if quant == "awq":
            return torch.float16  # AWQ kernels run in fp16 (§0.6)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if precision not in dtypes:
            raise SettingError("precision", f"must be one of {sorted(dtypes)}, got {precision!r}")
        return dtypes[precision]

    @abstractmethod
    def _model_class(self) -> type: ...

    def _config_overrides(self, config: dict[str, Any]) -> dict[str, Any]:
        """Config values to set explicitly at load time, where the published ``config.json`` leaves them to a
        library default that does not describe its weights (none by default)."""
        return {}

    def _load_model(self, checkpoint: str | Path, config: dict[str, Any]) -> nn.Module:
        kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": self.attn_implementation,
                                  **self._config_overrides(config)}
        if self.device.type == "cuda":
            kwargs["device_map"] = str(self.device)
        from transformers.utils import logging as transformers_logging

        # no "Loading weights" bar per shard: the stage log already says what loads, and when it is done
        transformers_logging.disable_progress_bar()
        try:
            model = self._model_class().from_pretrained(str(checkpoint), **kwargs)
        except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a damaged weight file
            raise DecafError(f"cannot load the model from {checkpoint}: {str(exc).splitlines()[0]}") from exc
        return model.to(self.device).eval()

    def _load_processor(self, checkpoint: str | Path) -> Any:
        from transformers import AutoImageProcessor, AutoProcessor

        try:
            # the backend is chosen for the image processor alone: video processors have no PIL backend, so
            # ``backend=`` cannot go to AutoProcessor, which would hand it to both
            image_processor = AutoImageProcessor.from_pretrained(str(checkpoint), backend=self.image_processor_backend)
            processor = AutoProcessor.from_pretrained(str(checkpoint), image_processor=image_processor,
                                                      **self._processor_kwargs())
        except (OSError, ValueError, TypeError, ImportError) as exc:
            raise DecafError(f"cannot load the processor from {checkpoint}: {str(exc).splitlines()[0]}") from exc
        loaded = image_processor_backend_of(processor.image_processor)
        if loaded != self.image_processor_backend:  # a missing backend makes transformers fall back, with a warning
            raise DecafError(f"asked for the {self.image_processor_backend} image processor of {checkpoint} but "
                             f"transformers gave the {loaded} one; install "
                             f"{'Pillow' if self.image_processor_backend == 'pil' else 'torchvision'} or pass "
                             f"--image_processor {'fast' if loaded == 'torchvision' else 'slow'}")
        return processor

    def _processor_kwargs(self) -> dict[str, Any]:
        return {}

    # ----- what the capture engine needs (§3.0 iii) --------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    def attention_modules(self) -> list[nn.Module]:
        """Self-attention modules of the LLM decoder layers, in layer order (never the vision tower)."""
        return [layer.self_attn for layer in self.language_model.layers]

    # ----- chat rendering and text (§4.4, §4.5, §4.7) ------------------------------------------------------
    def messages(self, prompt: str, visual: str | None) -> list[dict[str, Any]]:
        """One conversation: optional system turn, then the user turn [visual item, text item]."""
        content: list[dict[str, Any]] = [] if visual is None else [{"type": visual}]
        content.append({"type": "text", "text": prompt})
        turns: list[dict[str, Any]] = []
        if self.system_message is not None:
            turns.append({"role": "system", "content": [{"type": "text", "text": self.system_message}]})
        turns.append({"role": "user", "content": content})
        return turns

    def render(self, prompt: str, visual: str | None) -> str:
        """The checkpoint's own chat template with the generation prompt (§4.5)."""
        return self.processor.apply_chat_template(self.messages(prompt, visual), add_generation_prompt=True,
                                                  tokenize=False)

    def text_inputs(self, prompt: str) -> dict[str, Any]:
        """Call 3: a text-only sequence."""
        inputs = self.processor(text=[self.render(prompt, None)], return_tensors="pt")
        return self._to_device(inputs)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """New tokens → text: skip specials, no clean-up, stripped (§4.7)."""
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [text.strip() for text in texts]

    def _to_device(self, inputs: Any) -> dict[str, Any]:
        out = {}
        for name, value in dict(inputs).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point() and name.startswith("pixel_values"):
                    value = value.to(self.dtype)
            out[name] = value
        return out

    def _batch(self, inputs: Any, visual_token_ids: Sequence[int], grid: tuple[int, int, int],
               tiling: tuple[int, int] | None = None) -> VisualBatch:
        """Wrap processor outputs; V = positions of the visual placeholder ids, |V| = t·h·w asserted (§3.0)."""
        inputs = self._to_device(inputs)
        ids = inputs["input_ids"]
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for token_id in visual_token_ids:
            visual |= ids == token_id
        key_mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        expected = grid[0] * grid[1] * grid[2]
        counts = visual.sum(dim=1).tolist()
        if any(count != expected for count in counts):
            raise RuntimeError(f"{self.family}: rows have {counts} visual tokens but the map grid {grid} needs "
                               f"{expected}")
        return VisualBatch(inputs=inputs, visual_mask=visual, key_mask=key_mask, grid=grid, tiling=tiling)

    def position_ids(self, batch: VisualBatch) -> torch.Tensor | None:
        """Position ids of the batch's whole sequence, for passes continued after a cached prefix (SPEC §5.8f);
        None: 1-D positions, which the model continues from the cache length by itself."""
        return batch.inputs.get("position_ids")

    def row_map(self, values: torch.Tensor, batch: VisualBatch) -> torch.Tensor:
        """One row's visual values (sequence order) → its (t, h, w) map: row-major by default (§6.1)."""
        return values.reshape(batch.grid)

    # ----- family specifics ---------------------------------------------------------------------------------
    @abstractmethod
    def video_batch(self, frames: Sequence[Path], prompt: str) -> VisualBatch:
        """Calls 1 and 4: the T sampled frames as one video sequence."""

    @abstractmethod
    def frame_batch(self, frames: Sequence[Path], prompt: str, video: VisualBatch) -> VisualBatch:
        """Calls 2 and 5: one single-image conversation per frame; ``video`` is the same kind's video pass."""

    def settings(self) -> dict[str, Any]:
        """Resolution and kernel settings recorded in the cache (§12.2 ``settings``)."""
        image_processor = self.processor.image_processor
        return {
            "attn_max_token": self.options.attn_max_token,
            "attn_resize_scale": self.options.attn_resize_scale,
            "attn_max_token_per_image": self.options.attn_max_token_per_image,
            "max_patches": self.options.max_patches,
            "attn_implementation": self.attn_implementation,
            "model_dtype": str(self.dtype).replace("torch.", ""),
            # the class name alone misleads: under transformers 5 it names the torchvision processor (§3.1)
            "image_processor": f"{type(image_processor).__name__} "
                               f"({BACKEND_LABELS[image_processor_backend_of(image_processor)]} backend)",
            **self.matched_settings(self.image_processor_choice),
        }
