"""`PromptEncoder` and `collate` against the real Mllama processor of the demo checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from model.encoding import PromptEncoder, collate
from model.engine import ChatTurn, ImagePart, TextPart
from model.errors import InputRejected


@pytest.fixture(scope="module")
def processor(demo_model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(demo_model_dir)


def turns(text: str, *images: Image.Image) -> tuple[ChatTurn, ...]:
    parts = (*(ImagePart(i) for i in images), TextPart(text))
    return (ChatTurn("user", parts),)


def picture(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 5):
        img.putpixel((x, x % size[1]), (255 - color[0], 40, 90))
    return img


CASES = [
    [turns("hi"), turns("a much longer question about the harbour at dawn, with details")],
    [
        turns("what is this?", picture((90, 60), (200, 10, 10))),
        turns(
            "and these two, compared at length?",
            picture((40, 130), (0, 200, 0)),
            picture((300, 80), (0, 0, 250)),
        ),
        turns("none here, only words, many words, more words than the others"),
    ],
]


@pytest.mark.parametrize("batch", CASES, ids=["text", "images"])
def test_collate_equals_the_processor_with_padding(processor: Any, batch: list[Any]) -> None:
    encoder = PromptEncoder(processor)
    rendered = [encoder.render(t) for t in batch]
    ours = collate([encoder.encode(p, imgs) for p, imgs in rendered], encoder.pad_id)
    # The reference: the processor's own padded batch, on a private copy (never the shared one).
    private = copy.deepcopy(processor)
    private.tokenizer.padding_side = "left"
    has_images = any(imgs for _, imgs in rendered)
    want = private(
        text=[p for p, _ in rendered],
        images=[imgs for _, imgs in rendered] if has_images else None,
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert sorted(ours) == sorted(want.keys())
    for key, value in want.items():
        assert torch.equal(ours[key], value), key
    assert len({int(n) for n in ours["attention_mask"].sum(-1)}) == len(batch)  # really padded


def test_count_equals_the_encoded_length(processor: Any) -> None:
    encoder = PromptEncoder(processor)
    conversation = turns("count me", picture((90, 60), (1, 2, 3)))
    prompt, images = encoder.render(conversation)
    assert encoder.count(conversation) == encoder.encode(prompt, images).num_tokens > 5


def test_the_tokenizer_is_never_left_padding(processor: Any) -> None:
    encoder = PromptEncoder(processor)
    rows = [encoder.encode(encoder.render(turns("x" * n))[0], []) for n in (1, 50)]
    collate(rows, encoder.pad_id)
    backend = encoder.tokenizer.backend_tokenizer
    assert backend.padding is None and backend.truncation is None


def test_an_image_the_processor_refuses_is_the_requests_fault(processor: Any) -> None:
    encoder = PromptEncoder(processor)
    prompt, _ = encoder.render(turns("look", picture((20, 20), (0, 0, 0))))
    # A real image the real image processor cannot take (0x0 pixels: it divides by zero).
    with pytest.raises(InputRejected) as info:
        encoder.encode(prompt, [Image.new("RGB", (0, 0))])
    assert info.value.__cause__ is not None  # the processor's own exception, kept for the log
