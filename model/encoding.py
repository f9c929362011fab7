"""The one owner of a checkpoint's processor: conversations in, token counts and tensors out.

Why it exists: a fast tokenizer keeps its padding and truncation settings as mutable state on
the shared Rust object. A padded batch encode (`padding=True`) in the scheduler thread and a
plain token count in a request thread used to interleave, leaving the batch unpadded ("expected
sequence of length N at dim 1 (got M)") and failing ~1% of batched requests (issue 13). So:

- every tokenizer call of an engine goes through a `PromptEncoder` and holds its lock (each
  call is one prompt: microseconds to a few milliseconds);
- nothing ever asks the tokenizer to pad or truncate: `collate` pads a batch here, in torch, so
  the Rust object's settings never change after `__init__`;
- the image processor (stateless) runs outside the lock, so one request's image work never
  delays another's token count.

Both engines (batch and fast) and the upstream routes' exact counter use it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from PIL.Image import Image
from transformers.models.mllama.processing_mllama import (
    build_string_from_input,
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from model.engine import ChatTurn
from model.errors import InputRejected
from model.prompt import PromptRenderer


@dataclass(frozen=True)
class EncodedImages:
    """The image tensors of one prompt (CPU), without a batch dimension."""

    pixel_values: torch.Tensor  # [images, max_tiles, C, H, W]
    aspect_ratio_ids: torch.Tensor  # [images]
    aspect_ratio_mask: torch.Tensor  # [images, max_tiles]
    cross_attention_mask: torch.Tensor  # [tokens, images, max_tiles]: tiles each token sees


@dataclass(frozen=True)
class EncodedPrompt:
    """One templated prompt as the model takes it (CPU tensors, no batch dimension)."""

    input_ids: torch.Tensor  # [tokens]
    images: EncodedImages | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class PromptEncoder:
    """Thread-safe rendering, counting and encoding over one processor (or bare tokenizer)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer: Any = getattr(processor, "tokenizer", processor)
        self.renderer = PromptRenderer(processor)
        self._lock = threading.Lock()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a known, plain state, set once before any thread shares it
            backend.no_padding()
            backend.no_truncation()
        self._image_processor: Any = getattr(processor, "image_processor", None)
        image_token_id = getattr(processor, "image_token_id", None)
        self.image_token_id = None if image_token_id is None else int(image_token_id)
        self._image_token = getattr(processor, "image_token", None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    # -- text --------------------------------------------------------------------------------
    def _model_text(self, prompt: str) -> str:
        """The text the Mllama processor would tokenize (it adds BOS when the prompt has none)."""
        bos = self.tokenizer.bos_token
        if self._image_processor is None or self._image_token is None or not bos:
            return prompt  # a bare tokenizer (an upstream route's counter): the text as is
        return str(build_string_from_input(prompt, bos, self._image_token))

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of one templated prompt (no special tokens added, never padded)."""
        text = self._model_text(prompt)
        with self._lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def render(
        self, turns: tuple[ChatTurn, ...], tools_json: str | None = None
    ) -> tuple[str, list[Image]]:
        return self.renderer.render(turns, tools_json)

    def count(self, turns: tuple[ChatTurn, ...], tools_json: str | None = None) -> int:
        """Exact prompt tokens of a conversation, as `encode` will produce them."""
        prompt, _ = self.renderer.render(turns, tools_json)
        return len(self.token_ids(prompt))

    # -- model inputs ------------------------------------------------------------------------
    def encode(self, prompt: str, images: list[Image]) -> EncodedPrompt:
        """Token ids and image tensors of one templated prompt.

        Raises `InputRejected` when the request's own input cannot be encoded (an image the
        image processor refuses, or images that do not match the prompt's image tokens).
        """
        ids = torch.tensor(self.token_ids(prompt), dtype=torch.long)
        if not images:
            return EncodedPrompt(ids)
        if self._image_processor is None or self.image_token_id is None:
            raise InputRejected("This model does not accept images.")
        found = int((ids == self.image_token_id).sum())
        if found != len(images):
            raise InputRejected(
                f"The prompt has {found} image placeholders for {len(images)} images."
            )
        try:
            feats = self._image_processor(images=[list(images)], return_tensors="pt")
        except Exception as exc:
            raise InputRejected("An image of this request could not be processed.") from exc
        num_tiles = feats.pop("num_tiles")
        token_mask = get_cross_attention_token_mask(ids.tolist(), self.image_token_id)
        dense = convert_sparse_cross_attention_mask_to_dense(
            [token_mask],
            num_tiles=num_tiles,
            max_num_tiles=self._image_processor.max_image_tiles,
            length=len(ids),
        )
        return EncodedPrompt(
            ids,
            EncodedImages(
                pixel_values=feats["pixel_values"][0],
                aspect_ratio_ids=feats["aspect_ratio_ids"][0],
                aspect_ratio_mask=feats["aspect_ratio_mask"][0],
                cross_attention_mask=torch.from_numpy(dense[0]),
            ),
        )


def collate(rows: list[EncodedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch, as the Mllama processor would return it with `padding=True` (and
    padding side left): padded tokens are `pad_id` with attention 0; missing images are zero
    pixels with aspect-ratio id 0 and only their first tile marked, as the processor pads."""
    length = max(r.num_tokens for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, length - row.num_tokens :] = row.input_ids
        attention_mask[b, length - row.num_tokens :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    with_images = [r.images for r in rows if r.images is not None]
    if not with_images:
        return batch
    first = with_images[0]
    count = max(i.pixel_values.shape[0] for i in with_images)
    tiles = first.pixel_values.shape[1]
    pixels = first.pixel_values.new_zeros((len(rows), count, *first.pixel_values.shape[1:]))
    ratio_ids = torch.zeros((len(rows), count), dtype=first.aspect_ratio_ids.dtype)
    ratio_mask = torch.zeros((len(rows), count, tiles), dtype=first.aspect_ratio_mask.dtype)
    ratio_mask[:, :, 0] = 1
    cross = torch.zeros((len(rows), length, count, tiles), dtype=first.cross_attention_mask.dtype)
    for b, row in enumerate(rows):
        if row.images is None:
            continue
        img, n = row.images, row.images.pixel_values.shape[0]
        pixels[b, :n] = img.pixel_values
        ratio_ids[b, :n] = img.aspect_ratio_ids
        ratio_mask[b, :n] = img.aspect_ratio_mask
        cross[b, length - row.num_tokens :, :n] = img.cross_attention_mask
    batch.update(
        pixel_values=pixels,
        aspect_ratio_ids=ratio_ids,
        aspect_ratio_mask=ratio_mask,
        cross_attention_mask=cross,
    )
    return batch
