"""A group of Llama Guard prompts as model inputs: left-padded token ids and, for a group of
image items (vision model), the image features and the cross-attention mask.

The cross-attention mask is built here with the processor's own helpers (from the `<|image|>`
token positions and each image's tiles) because the ids are ours, tokenised with the user's text
sanitised and padded on the left, not the processor's.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL.Image import Image
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)


def padded_inputs(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask`, each row padded on the left to the longest."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, length - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def image_inputs(
    input_ids: torch.Tensor,
    images: list[Image],
    *,
    processor: Any,
    image_token_id: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The vision inputs of rows that each hold one image (`input_ids` already padded)."""
    feats = processor.image_processor(images=[[img] for img in images], return_tensors="pt")
    num_tiles = feats.pop("num_tiles")
    token_masks = [
        get_cross_attention_token_mask(row, image_token_id) for row in input_ids.tolist()
    ]
    dense = convert_sparse_cross_attention_mask_to_dense(
        token_masks,
        num_tiles=num_tiles,
        max_num_tiles=processor.image_processor.max_image_tiles,
        length=input_ids.shape[1],
    )
    return {
        "cross_attention_mask": torch.from_numpy(dense),
        "pixel_values": feats["pixel_values"].to(dtype),
        "aspect_ratio_ids": feats["aspect_ratio_ids"],
        "aspect_ratio_mask": feats["aspect_ratio_mask"],
    }
