"""Forward passes of a batch through a transformers Mllama model, with a KV cache.

The runner owns tensors and the cache; the scheduler owns requests, sampling and text. A batch
is prefilled once (the vision encoder runs there, and the cross-attention K/V land in the cache),
then decoded one token per step. Finished rows are dropped from the cache so that they stop
costing compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from model.encoding import EncodedPrompt, collate


@dataclass
class BatchState:
    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T]
    next_position: torch.Tensor  # [B, 1]: position id of the next token
    cross_attention_mask: torch.Tensor | None  # [B, 1, images, tiles]: the last text row
    prompt_tokens: list[int]


class MllamaRunner:
    """Prefill and decode steps for one batch at a time (not thread-safe: one worker calls it)."""

    def __init__(self, model: Any, pad_id: int, device: torch.device) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.config.get_text_config(decoder=True).vocab_size)

    def _forward(self, **inputs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def prefill(self, rows: list[EncodedPrompt]) -> tuple[torch.Tensor, BatchState]:
        """Run the encoded prompts (left-padded here) and return next-token logits [B, V]."""
        # Padded by `collate`, never by the tokenizer: its padding state is shared (encoding.py).
        encoded = collate(rows, self.pad_id)
        has_images = "pixel_values" in encoded
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded["attention_mask"].to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "cache": cache,
        }
        cross_mask_last: torch.Tensor | None = None
        if has_images:
            cross_mask = encoded["cross_attention_mask"].to(self.device)
            inputs.update(
                pixel_values=encoded["pixel_values"].to(self.device, self.dtype),
                aspect_ratio_ids=encoded["aspect_ratio_ids"].to(self.device),
                aspect_ratio_mask=encoded["aspect_ratio_mask"].to(self.device),
                cross_attention_mask=cross_mask,
            )
            # Decode steps reuse the last text row of the mask, as generate() does.
            cross_mask_last = cross_mask[:, -1:].clone()
        logits = self._forward(**inputs)
        state = BatchState(
            cache=cache,
            attention_mask=attention_mask,
            next_position=position_ids[:, -1:] + 1,
            cross_attention_mask=cross_mask_last,
            prompt_tokens=[int(n) for n in attention_mask.sum(dim=-1).tolist()],
        )
        return logits, state

    def decode(self, state: BatchState, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return the next logits [B, V]."""
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        ones = torch.ones_like(input_ids, dtype=state.attention_mask.dtype)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=-1)
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": state.attention_mask,
            "position_ids": state.next_position,
            "cache": state.cache,
        }
        if state.cross_attention_mask is not None:
            inputs["cross_attention_mask"] = state.cross_attention_mask
        logits = self._forward(**inputs)
        state.next_position = state.next_position + 1
        return logits

    def keep(self, state: BatchState, rows: list[int]) -> None:
        """Drop every row not in `rows` from the batch (finished or cancelled requests)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        state.cache.batch_select_indices(index)
        state.attention_mask = state.attention_mask.index_select(0, index)
        state.next_position = state.next_position.index_select(0, index)
        if state.cross_attention_mask is not None:
            state.cross_attention_mask = state.cross_attention_mask.index_select(0, index)
        state.prompt_tokens = [state.prompt_tokens[i] for i in rows]
