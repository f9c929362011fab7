"""Mllama's vision attention without its N x N mask: the same result, from mask-free SDPA calls.

The vision encoder pads every tile from 1,601 to 1,608 tokens and every image to 4 tiles, and
builds one additive mask `[images, 1, N, N]` (N = 4 x 1,608 = 6,432) that is `finfo.min` exactly
where *both* the query and the key are padding (`_prepare_aspect_ratio_attention_mask`: the outer
product of the padding indicator). So:

- a real query attends to every key, padding included, with no mask at all;
- a padding query attends to the real keys only.

transformers passes that mask to SDPA in all 40 layers, which rules out the flash kernel (no
masks) and reads an 83 MB bias per layer and head on the GPU. Here each image's queries are split
into those two groups, and each group is one SDPA call with no mask (on CUDA any mask-free
kernel: flash, or cuDNN where SDPA prefers it on sm90): the real queries over all keys, the
padding queries over the real keys. Masked scores in
transformers' softmax are `score + finfo.min`, whose exponential is exactly 0, so the two
computations agree up to kernel rounding (tests: the vision model's outputs with and without,
for 1, 2 and 4-tile images and two images in one call).

The padding positions come from the mask's diagonal, once per encoder call (one host sync),
not once per layer. Used by the fast engine around its own vision encoder calls
(`vision_attention_without_mask`); the model's configured attention is restored afterwards, so
`generate()` on the same model is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

NAME = "mllama_vision_split_padding"


class SplitPaddingAttention:
    """An `AttentionInterface` function for Mllama's vision attention (`[B, H, N, D]` inputs,
    `[B, N, H, D]` output, as transformers' SDPA function), for one encoder call: every layer
    gets the same mask, so the padding positions are found once (a host sync), not per layer."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None
        self._groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # per image: real, padded

    def groups(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if attention_mask is not self._mask:
            # A padding token's own (query, key) pair is masked, a real token's is not.
            padding = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1) < 0  # [B, N]
            self._groups = [
                (torch.nonzero(~row).squeeze(-1), torch.nonzero(row).squeeze(-1)) for row in padding
            ]
            self._mask = attention_mask
        return self._groups

    def __call__(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, scale=scaling
            )
            return out.transpose(1, 2).contiguous(), None
        out = torch.empty_like(query)
        for b, (real, padded) in enumerate(self.groups(attention_mask)):
            q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
            if padded.numel() == 0:
                out[b : b + 1] = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, scale=scaling
                )
                continue
            out[b, :, real] = F.scaled_dot_product_attention(
                q[:, :, real], k, v, dropout_p=dropout, scale=scaling
            )[0]
            out[b, :, padded] = F.scaled_dot_product_attention(
                q[:, :, padded], k[:, :, real], v[:, :, real], dropout_p=dropout, scale=scaling
            )[0]
        return out.transpose(1, 2).contiguous(), None


@contextmanager
def vision_attention_without_mask(vision_model: Any) -> Iterator[None]:
    """Run `vision_model` with a fresh `SplitPaddingAttention` inside the block (not
    thread-safe: it switches the vision config's attention implementation for the block's
    duration, and registers the function under `NAME` for it)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, SplitPaddingAttention())
    config = vision_model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
