"""transformers with the cross-attention row-mask fix (#39379), as a reference for checks.

`transformers_row_mask_fix()` patches `MllamaCrossAttentionDecoderLayer.forward` for the duration
of a `with` block so that it zeroes the attention output of fully masked rows as well as the MLP
output, as Meta's reference code does. `model.generate()` under it is what the fast engine must
reproduce for image requests (whose tokens before `<|image|>` are such rows); text-only requests
are unaffected (transformers skips the layer for them). Used by tests and `bench/engine_gpu.py`;
never at serving time. Not thread-safe: it patches a class.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.models.mllama import modeling_mllama


def _fixed_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cross_attention_states: torch.Tensor | None,
    cross_attention_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    full_text_row_masked_out_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    use_cache: bool | None = False,
    position_embeddings: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.cross_attn(
        hidden_states=hidden_states,
        attention_mask=cross_attention_mask,
        cross_attention_states=cross_attention_states,
        cache=cache,
        **kwargs,
    )
    if full_text_row_masked_out_mask is not None:  # the fix: transformers lacks this line
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


@contextmanager
def transformers_row_mask_fix() -> Iterator[None]:
    layer = modeling_mllama.MllamaCrossAttentionDecoderLayer
    original = layer.forward
    layer.forward = _fixed_forward  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        layer.forward = original  # type: ignore[method-assign]
