"""The demo checkpoint loads and behaves like the real Llama 3.2-Vision-Instruct directory."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, MllamaForConditionalGeneration

from model.demo_model import DEMO_MARKER, DEMO_VERSION, build_demo_model, ensure_demo_model

SPECIALS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|finetune_right_pad_id|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "<|eom_id|>": 8,
    "<|eot_id|>": 9,
    "<|python_tag|>": 10,
}  # offsets after the regular vocabulary, as 128000 + offset in the real model
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    assert build_demo_model(out) == out
    return out


@pytest.fixture(scope="module")
def processor(demo_dir: pathlib.Path) -> Any:
    return AutoProcessor.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def model(demo_dir: pathlib.Path) -> MllamaForConditionalGeneration:
    return MllamaForConditionalGeneration.from_pretrained(demo_dir).eval()


def _noise(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _prompt(processor: Any, text: str, image: bool = False) -> str:
    content: list[dict[str, str]] = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image"})
    messages = [{"role": "user", "content": content}]
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def _greedy(model: Any, processor: Any, text: str, image: Image.Image | None = None) -> list[int]:
    prompt = _prompt(processor, text, image is not None)
    images = [[image]] if image is not None else None
    batch = processor(text=[prompt], images=images, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    return [int(t) for t in out[0, batch["input_ids"].shape[1] :]]


def test_loads_like_the_real_checkpoint(demo_dir: pathlib.Path, processor: Any, model: Any) -> None:
    assert type(processor).__name__ == "MllamaProcessor"
    assert type(processor.image_processor).__name__.startswith("MllamaImageProcessor")
    assert model.config.model_type == "mllama"
    text, vision = model.config.text_config, model.config.vision_config
    tok = processor.tokenizer
    vocab = text.vocab_size
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == vocab == model.config.image_token_index == processor.image_token_id
    assert len(tok) == vocab + 1  # <|image|> is the only token outside the LM head
    assert model.get_output_embeddings().weight.shape[0] == vocab
    base = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert base == 1024  # the regular byte-level BPE vocabulary comes first
    for token, offset in SPECIALS.items():
        assert tok.convert_tokens_to_ids(token) == base + offset, token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    eot, eom, eos_text = base + 9, base + 8, base + 1
    assert text.bos_token_id == base and text.pad_token_id == base + 4 < vocab + 8
    assert list(model.generation_config.eos_token_id) == [eot, eom, eos_text]
    assert model.generation_config.pad_token_id == base + 4
    assert text.cross_attention_layers and vision.image_size == 56
    assert vision.vision_output_dim == vision.hidden_size * (
        1 + len(vision.intermediate_layers_indices)
    )
    assert processor.image_processor.size["height"] == processor.image_processor.size["width"] == 56
    assert processor.image_processor.max_image_tiles == 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (demo_dir / "model.safetensors").stat().st_size < 10_000_000
    assert AutoTokenizer.from_pretrained(demo_dir).chat_template == processor.chat_template


def test_chat_template(processor: Any) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "You are terse.<|eot_id|>" in text
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhat is this?<|image|><|eot_id|>" in text
    assert f"{ASSISTANT_HEADER}A cat.<|eot_id|>" in text
    assert text.count("<|image|>") == 1 and text.count("<|begin_of_text|>") == 1
    assert text.endswith(f"Are you sure?<|eot_id|>{ASSISTANT_HEADER}")
    without = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without.endswith("Are you sure?<|eot_id|>")
    # As in the checkpoint: no system block for an image conversation without a system message.
    image_only = processor.apply_chat_template(messages[1:2], tokenize=False)
    assert "system" not in image_only and "<|image|>" in image_only
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == without


def test_processor_mixed_batch(processor: Any) -> None:
    prompts = [
        _prompt(processor, "Describe the image.", image=True),
        _prompt(processor, "Tell me a long story about a fisherman and his dog, please."),
    ]
    batch = processor(
        text=prompts,
        images=[[_noise(0, (120, 50))], []],
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        return_tensors="pt",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    batch_size, length = ids.shape
    assert batch_size == 2 and mask.shape == ids.shape
    tok = processor.tokenizer
    assert (mask[:, -1] == 1).all() and mask[0, 0] == 0  # left padding; row 0 is the shorter
    assert (ids[mask == 0] == tok.pad_token_id).all()
    for row, row_mask in zip(ids, mask, strict=True):
        real = row[row_mask.bool()].tolist()
        assert real[0] == tok.bos_token_id and real.count(tok.bos_token_id) == 1
    assert batch["pixel_values"].shape == (2, 1, 4, 3, 56, 56)
    assert batch["aspect_ratio_ids"].tolist() == [[3], [0]]  # 1x3 tiles (id = layout + 1); none
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 0]], [[1, 0, 0, 0]]]
    cross = batch["cross_attention_mask"]
    assert cross.shape == (2, length, 1, 4)
    image_pos = ids[0].tolist().index(tok.convert_tokens_to_ids("<|image|>"))
    assert cross[0, :image_pos].sum() == 0 and (cross[0, image_pos:, 0, :3] == 1).all()
    assert cross[0, :, 0, 3].sum() == 0 and cross[1].sum() == 0


def test_generate_text_and_images(model: Any, processor: Any) -> None:
    eos_and_pad = {*model.generation_config.eos_token_id, processor.tokenizer.pad_token_id}
    texts = ["Hello, who are you?", "What is the capital of France?", "Write a poem."]
    outs = [_greedy(model, processor, t) for t in texts]
    assert all(len(o) >= 1 for o in outs)
    assert len({tuple(o) for o in outs}) > 1, outs  # different prompts, different answers
    assert all(t < model.config.text_config.vocab_size for o in outs for t in o)
    images = [_noise(i, (80 + 20 * i, 60)) for i in range(3)]
    images += [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
    answers = {tuple(_greedy(model, processor, "Describe the image.", im)) for im in images}
    assert len(answers) > 1, answers  # the image changes the answer: gates are open
    assert not any(set(a) <= eos_and_pad for a in answers)


def test_tokenizer_round_trips_utf8(processor: Any) -> None:
    tok = processor.tokenizer
    texts = [
        "Hello, world! 123 + 4567 = 4690.",
        "café naïve crème brûlée — “quotes” ‘and’ …",
        "日本語のテキスト, 中文, 한국어, русский, עברית, العربية",
        "emoji 🙂🦙👍🏽🇫🇷 and rare ones 🫠 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0000\t\r\n  trailing  ",
        "unseen: Ωμέγα ŋ ǅ ꙮ 𓀀",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert all(i < tok.convert_tokens_to_ids("<|begin_of_text|>") for i in ids)
    assert tok.encode("hi")[0] == tok.bos_token_id  # add_special_tokens=True prepends bos
    unseen = tok.encode("𓀀", add_special_tokens=False)  # not in the corpus: one token per byte
    assert len(unseen) == 4 and all(tok.decode([i]) != "𓀀" for i in unseen)  # partial UTF-8


def test_build_is_deterministic(demo_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    first = load_file(demo_dir / "model.safetensors")
    again = load_file(build_demo_model(tmp_path / "again", seed=0) / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(build_demo_model(tmp_path / "other", seed=1) / "model.safetensors")
    assert any(not torch.equal(first[k], other[k]) for k in first)
    gates = [v for k, v in first.items() if k.endswith("cross_attn_attn_gate")]
    assert gates and all((g != 0).all() for g in gates)
    tokenizer_json = (demo_dir / "tokenizer.json").read_text()
    assert (tmp_path / "again" / "tokenizer.json").read_text() == tokenizer_json


def test_greedy_never_ends_by_itself_whatever_the_date(model: Any, processor: Any) -> None:
    """The template writes today's date into every prompt; the demo model's greedy answers run
    to max_new_tokens on any day, so tests that need a long answer do not depend on the date."""
    eos = list(model.generation_config.eos_token_id)
    assert (model.lm_head.weight[eos] == 0).all()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Long answer please"}]}]
    for day in ("01 Jan 2024", "28 Nov 2026", "29 Feb 2028", "31 Dec 2030"):
        prompt = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, date_string=day
        )
        assert f"Today Date: {day}" in prompt
        batch = processor(text=[prompt], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=64, do_sample=False)
        new = out[0, batch["input_ids"].shape[1] :].tolist()
        assert len(new) == 64 and not set(new) & set(eos), day


def test_an_older_demo_directory_is_rebuilt(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "demo"
    ensure_demo_model(out)
    (out / DEMO_MARKER).write_text("seed=0\n")  # what version 1 wrote
    (out / "model.safetensors").write_bytes(b"stale")
    ensure_demo_model(out)
    assert (out / DEMO_MARKER).read_text() == f"seed=0 version={DEMO_VERSION}\n"
    assert load_file(out / "model.safetensors")  # a real checkpoint again
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    ensure_demo_model(out)  # current: reused as it is
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
