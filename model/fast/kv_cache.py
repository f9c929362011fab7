"""Static KV storage for the fast engine: fixed slots, allocated once from a memory budget.

Self-attention K/V live in one tensor per self-attention layer, `[slots, kv_heads, max_len + 1,
head_dim]`. A slot is a request's whole context (prompt and completion); the extra last column is
a scratch position that decode rows which are not decoding (free slots, slots still in prefill)
write to, so a fixed-shape decode step never touches another request's cache.

Cross-attention K/V live in one tensor per cross-attention layer, `[slots, kv_heads, max_vision,
head_dim]`, where `max_vision` holds `max_images_per_request` images of `max_num_tiles` tiles.
They are computed once per request at prefill from the vision encoder, and only the real tiles'
tokens are stored (padded tiles are trimmed per `aspect_ratio_mask`): a 1-tile image costs one
tile of attention per decode step, not four.

Everything is allocated when the engine starts: `slots = budget // bytes_per_slot`. A request
that needs more than a slot holds, or arrives when no slot and no waiting place is free, is
refused (`EngineOverloaded`) instead of running the device out of memory mid-flight.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CacheGeometry:
    """The sizes that decide how many bytes a slot costs."""

    self_layers: tuple[int, ...]  # decoder layer indices with self-attention
    cross_layers: tuple[int, ...]  # decoder layer indices with cross-attention
    kv_heads: int
    head_dim: int
    vocab_size: int  # rows of the LM head (penalty counts per slot)
    tokens_per_tile: int  # vision tokens per tile (1601 for the real model)
    max_tiles: int  # tiles per image
    max_len: int  # context per slot: prompt + completion
    max_images: int  # images per request
    dtype: torch.dtype

    @classmethod
    def from_model(
        cls, model: Any, *, max_len: int, max_images: int, dtype: torch.dtype
    ) -> CacheGeometry:
        text = model.config.get_text_config(decoder=True)
        vision = model.config.vision_config
        cross = tuple(int(i) for i in text.cross_attention_layers)
        return cls(
            self_layers=tuple(i for i in range(text.num_hidden_layers) if i not in cross),
            cross_layers=cross,
            kv_heads=int(text.num_key_value_heads),
            head_dim=int(text.hidden_size // text.num_attention_heads),
            vocab_size=int(model.lm_head.out_features),
            tokens_per_tile=int(model.model.vision_model.num_patches),
            max_tiles=int(vision.max_num_tiles),
            max_len=max_len,
            max_images=max_images,
            dtype=dtype,
        )

    @property
    def max_vision_tokens(self) -> int:
        return self.max_images * self.max_tiles * self.tokens_per_tile

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def self_bytes_per_slot(self) -> int:
        per_token = 2 * self.kv_heads * self.head_dim * self.element_size  # K and V
        return len(self.self_layers) * per_token * (self.max_len + 1)

    @property
    def cross_bytes_per_slot(self) -> int:
        per_token = 2 * self.kv_heads * self.head_dim * self.element_size
        return len(self.cross_layers) * per_token * self.max_vision_tokens

    @property
    def bytes_per_slot(self) -> int:
        # + float32 token counts for presence/frequency penalties, kept on the device.
        return self.self_bytes_per_slot + self.cross_bytes_per_slot + 4 * self.vocab_size


def plan_slots(geometry: CacheGeometry, budget_bytes: int, max_slots: int) -> int:
    """How many slots a budget pays for (capped at `max_slots`); 0 when not even one fits."""
    return max(0, min(max_slots, budget_bytes // geometry.bytes_per_slot))


class StaticKVCache:
    """The per-slot K/V tensors and which slots are free (allocation is lowest slot first)."""

    def __init__(self, geometry: CacheGeometry, slots: int, device: torch.device) -> None:
        if slots < 1:
            raise ValueError("a cache needs at least one slot")
        g = geometry
        self.geometry = g
        self.slots = slots
        self.device = device
        self.scratch = g.max_len  # the write position of rows that are not decoding
        self_shape = (slots, g.kv_heads, g.max_len + 1, g.head_dim)
        cross_shape = (slots, g.kv_heads, g.max_vision_tokens, g.head_dim)
        # zeros, not empty: rows that are computed and discarded must read finite numbers.
        self.self_k = {
            i: torch.zeros(self_shape, dtype=g.dtype, device=device) for i in g.self_layers
        }
        self.self_v = {
            i: torch.zeros(self_shape, dtype=g.dtype, device=device) for i in g.self_layers
        }
        self.cross_k = {
            i: torch.zeros(cross_shape, dtype=g.dtype, device=device) for i in g.cross_layers
        }
        self.cross_v = {
            i: torch.zeros(cross_shape, dtype=g.dtype, device=device) for i in g.cross_layers
        }
        # Per slot, which vision tokens its decode steps see (the last prompt row of its cross
        # mask, repeated by every decode step as `generate()` does); all False: no image. Kept
        # on the device so a decode step only slices it.
        self.vision_mask = torch.zeros(
            slots, max(1, g.max_vision_tokens), dtype=torch.bool, device=device
        )
        # Lowest slot first keeps the busy slots packed at the front, so a decode step can run
        # on the prefix `[:n]` of every tensor (views, no gathers).
        self._free = list(range(slots))
        heapq.heapify(self._free)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def set_vision_mask(self, slot: int, mask: torch.Tensor | None) -> None:
        row = self.vision_mask[slot]
        row.zero_()
        if mask is not None:
            row[: mask.shape[-1]] = mask

    def release(self, slot: int) -> None:
        # Nothing to clear: lengths and masks kept by the scheduler decide what is read.
        heapq.heappush(self._free, slot)

    @property
    def allocated_bytes(self) -> int:
        tensors = [*self.self_k.values(), *self.self_v.values()]
        tensors += [*self.cross_k.values(), *self.cross_v.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class ImageStateCache:
    """Projected vision states of recent images, by image hash (LRU, capped in bytes).

    A hit skips the vision encoder and the projector; the per-layer K/V projections (cheap) are
    recomputed from the stored states, which are 4x smaller than the K/V of 8 layers.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = states
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)
