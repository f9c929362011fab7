"""Step 3 of a continuous-batching step: the newcomers' images into their slots.

The images of the oldest newcomers (requests admitted to a slot whose images are not encoded
yet) go through the vision encoder in one call, at most `vision_tiles_per_step` tiles and at
least one request's, unless their content hash is in the image cache. Each request's projected
states become its slot's cross-attention K/V, written once; the last prompt token's tile mask
becomes the slot's vision mask for decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.fast.config import FastEngineConfig
from model.fast.forward import FastForward
from model.fast.kv_cache import ImageStateCache, StaticKVCache
from model.fast.sequence import FastSequence, PreparedImages


class VisionStep:
    """The vision phase of `ContinuousBatcher` (called from its worker thread only)."""

    def __init__(
        self,
        forward: FastForward,
        cache: StaticKVCache,
        config: FastEngineConfig,
        image_cache: ImageStateCache | None,
    ) -> None:
        self.forward = forward
        self.cache = cache
        self.config = config
        self.image_cache = image_cache

    def run(self, running: Sequence[FastSequence]) -> None:
        """Encode the oldest newcomers' images in one vision call (up to the tile budget)."""
        chosen: list[FastSequence] = []
        tiles = 0
        for seq in running:
            if seq.vision_ready or seq.done or seq.images is None or seq.slot is None:
                continue
            need = sum(seq.images.tiles)
            if chosen and tiles + need > self.config.vision_tiles_per_step:
                break
            chosen.append(seq)
            tiles += need
        if not chosen:
            return
        states = self.states([s.images for s in chosen if s.images is not None])
        for seq, per_image in zip(chosen, states, strict=True):
            assert seq.slot is not None and seq.tile_mask is not None
            joined = torch.cat(per_image, dim=0)
            self.forward.write_cross_kv(seq.slot, joined)
            seq.vision_tokens = int(joined.shape[0])
            last = seq.tile_mask[-1].repeat_interleave(self.forward.tokens_per_tile)
            self.cache.set_vision_mask(seq.slot, last.to(self.forward.device))
            seq.vision_ready = True

    def states(self, requests: list[PreparedImages]) -> list[list[torch.Tensor]]:
        """Projected states of every image of every request: cached, or encoded in one call.

        The encoder treats each image on its own, so images of different requests can share a
        call (the processor pads every image to `max_num_tiles`, so their tensors stack).
        """
        cache = self.image_cache
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, tuple[int, int]] = {}  # key -> (request, image) to encode
        for r, images in enumerate(requests):
            for i, key in enumerate(images.keys):
                if key in found or key in missing:
                    continue
                hit = cache.get(key) if cache is not None else None
                if hit is not None:
                    found[key] = hit
                else:
                    missing[key] = (r, i)
        if missing:
            where = list(missing.values())

            def stack(name: str) -> torch.Tensor:
                return torch.cat(
                    [getattr(requests[r], name)[:, i : i + 1] for r, i in where], dim=1
                )

            encoded = self.forward.encode_images(
                stack("pixel_values"), stack("aspect_ratio_ids"), stack("aspect_ratio_mask")
            )
            for key, got in zip(missing, encoded, strict=True):
                found[key] = got
                if cache is not None:
                    cache.put(key, got)
        return [[found[key] for key in images.keys] for images in requests]
