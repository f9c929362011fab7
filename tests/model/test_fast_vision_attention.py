"""Mllama's vision encoder with `split_padding_attention` equals transformers' masked SDPA."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from model.fast.vision_attention import NAME, SplitPaddingAttention, vision_attention_without_mask


class AttentionMasks(TorchDispatchMode):
    """Records, for every SDPA call, whether it was given a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.masked: list[bool] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func):
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            self.masked.append(mask is not None)
        return func(*args, **kwargs)


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    img = Image.new("RGB", size, (20 * seed % 256, 200, 30))
    for x in range(0, size[0], 5):
        img.putpixel((x, (x * seed) % size[1]), (255, 0, 0))
    return img


@pytest.mark.parametrize(
    "sizes",
    [[(56, 56)], [(112, 56)], [(112, 112)], [(56, 56), (112, 112)]],
    ids=["1 tile", "2 tiles", "4 tiles", "two images"],
)
def test_vision_encoder_output_unchanged_and_unmasked(
    loaded: tuple[Any, Any], sizes: list[tuple[int, int]]
) -> None:
    model, processor = loaded
    vision = model.model.vision_model
    images = [picture(size, i + 1) for i, size in enumerate(sizes)]
    enc = processor(text=["<|image|>" * len(images) + "hi"], images=[images], return_tensors="pt")
    inputs = {k: enc[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    before = vision.config._attn_implementation
    with torch.inference_mode():
        with AttentionMasks() as plain:
            want = vision(**inputs).last_hidden_state
        with vision_attention_without_mask(vision), AttentionMasks() as split:
            assert vision.config._attn_implementation == NAME
            got = vision(**inputs).last_hidden_state
    assert vision.config._attn_implementation == before  # restored: generate() is unchanged
    assert torch.allclose(got, want, atol=1e-5)
    # transformers masks every layer's attention; the split calls never take a mask.
    assert plain.masked and all(plain.masked)
    assert split.masked and not any(split.masked)


def test_padding_queries_see_only_real_keys(loaded: tuple[Any, Any]) -> None:
    """The padded tiles' outputs (which real tokens attend to in later layers) match too."""
    model, processor = loaded
    vision = model.model.vision_model
    enc = processor(text=["<|image|>hi"], images=[[picture((56, 56), 3)]], return_tensors="pt")
    inputs = {k: enc[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    assert enc["aspect_ratio_mask"].tolist() == [[[1, 0, 0, 0]]]
    with torch.inference_mode():
        want = vision(**inputs).last_hidden_state[0, 0, 1:]  # the three padded tiles
        with vision_attention_without_mask(vision):
            got = vision(**inputs).last_hidden_state[0, 0, 1:]
    assert want.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-5)


def test_padding_positions_found_once_per_encoder_call() -> None:
    """Every layer gets the same mask object: its padding positions are computed once."""
    # Two tiles of 3 tokens (the last one padding), the second tile padded: the outer product.
    padding = torch.tensor([[False, False, True, True, True, True]])
    mask = (padding[:, :, None] & padding[:, None, :]).float()[:, None] * torch.finfo().min
    split = SplitPaddingAttention()
    groups = split.groups(mask)
    assert [g.tolist() for g in groups[0]] == [[0, 1], [2, 3, 4, 5]]
    assert split.groups(mask) is groups  # the next layer: no new host sync
    assert split.groups(mask.clone()) is not groups  # the next call's mask: found again
