"""The fast forward itself against transformers: logits of prefill, chunked prefill and decode,
and the cross-attention row mask of huggingface/transformers#39379."""

from __future__ import annotations

from typing import Any

import torch

from model.engine import (
    ChatTurn,
    ImagePart,
    TextPart,
)
from model.fast.forward import FastForward, PrefillChunk
from model.prompt import render_prompt
from testkit.fast_reference import transformers_row_mask_fix
from tests.model.fast_support import (
    RED,
    TEXTS,
    decode_step,
    encode,
    image,
    prefill,
)


@torch.inference_mode()
def test_prefill_and_decode_logits_equal_transformers(
    forward: FastForward, loaded: tuple[Any, Any]
) -> None:
    model = loaded[0]
    for slot, inputs in enumerate(
        [encode(loaded, TEXTS[1]), encode(loaded, "What is in this picture?", image(RED))]
    ):
        with transformers_row_mask_fix():
            out = model(**inputs, use_cache=True)
        ours, mask = prefill(forward, slot, inputs)
        assert torch.allclose(ours, out.logits[0, -1], atol=1e-4)
        # Chunked prefill (7 tokens a step) gives the same logits.
        chunked, _ = prefill(forward, slot + 2, inputs, chunk=7)
        assert torch.allclose(chunked, ours, atol=1e-4)
        # One decode step against transformers' cache.
        token = int(ours.argmax())
        step: dict[str, Any] = {"input_ids": torch.tensor([[token]]), "cache": out.cache}
        if "cross_attention_mask" in inputs:
            step["cross_attention_mask"] = inputs["cross_attention_mask"][:, -1:]
        with transformers_row_mask_fix():
            want = model(**step, use_cache=True).logits[0, -1]
        n_prompt = inputs["input_ids"].shape[1]
        got = decode_step(forward, {slot: (token, n_prompt, mask)})[slot]
        assert torch.allclose(got, want, atol=1e-4)


@torch.inference_mode()
def test_text_row_batched_with_an_image_row_equals_alone(
    forward: FastForward, loaded: tuple[Any, Any]
) -> None:
    """The #39379 fix: our forward gives a text row the same logits next to an image row."""
    text_inputs = encode(loaded, TEXTS[0])
    image_inputs = encode(loaded, "What is in this picture?", image(RED))
    alone, _ = prefill(forward, 0, text_inputs)
    n_text = text_inputs["input_ids"].shape[1]
    alone_next = decode_step(forward, {0: (5, n_text, None)})[0]
    # Now slot 1 holds an image request; prefill both in one batch, then decode both.
    states = forward.encode_images(
        image_inputs["pixel_values"],
        image_inputs["aspect_ratio_ids"],
        image_inputs["aspect_ratio_mask"],
    )
    forward.write_cross_kv(1, torch.cat(states))
    tiles = int(image_inputs["aspect_ratio_mask"][0, 0].sum())
    vision = image_inputs["cross_attention_mask"][0, :, 0, :tiles].bool()
    vision = vision.repeat_interleave(forward.tokens_per_tile, dim=1)
    chunks = [
        PrefillChunk(0, text_inputs["input_ids"][0], 0, None, want_logits=True),
        PrefillChunk(1, image_inputs["input_ids"][0], 0, vision, want_logits=True),
    ]
    batched = forward.prefill(chunks)
    assert torch.allclose(batched[0], alone, atol=1e-4)
    n_image = image_inputs["input_ids"].shape[1]
    both = decode_step(forward, {0: (5, n_text, None), 1: (5, n_image, vision[-1])})
    assert torch.allclose(both[0], alone_next, atol=1e-4)


@torch.inference_mode()
def test_transformers_batches_text_with_images_differently(loaded: tuple[Any, Any]) -> None:
    """The bug itself: transformers' own forward changes a text row batched with an image row
    (and stops changing it once the fix is patched in)."""
    model, processor = loaded
    processor.tokenizer.padding_side = "left"
    prompts, images = [], []
    for turns in [
        (ChatTurn("user", (TextPart(TEXTS[0]),)),),
        (ChatTurn("user", (ImagePart(image(RED)), TextPart("What is in this picture?"))),),
    ]:
        prompt, imgs = render_prompt(processor, turns)
        prompts.append(prompt)
        images.append(imgs)
    batch = processor(
        text=prompts, images=images, padding=True, add_special_tokens=False, return_tensors="pt"
    )
    alone = processor(text=prompts[:1], add_special_tokens=False, return_tensors="pt")
    want = model(**alone).logits[0, -1]
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    buggy = model(**batch, position_ids=position_ids).logits[0, -1]
    with transformers_row_mask_fix():
        fixed = model(**batch, position_ids=position_ids).logits[0, -1]
    assert (buggy - want).abs().max() > 1e-2
    assert torch.allclose(fixed, want, atol=1e-4)
