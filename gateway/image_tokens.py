"""What an image costs the model in tokens: the tiles it is cut into times the vision tokens per
tile (1601 for Llama 3.2-Vision: a 40x40 patch grid plus the class token; up to 4 tiles, 6404).

The tile layout is the one the Mllama image processor picks (`get_optimal_tiled_canvas`, the
same function, so the count is the processor's without resizing any pixels). Tile size, the
maximum tiles and the patch size are read from the engine's processor and vision config when it
has them (the demo model's tiny ones differ), else Llama 3.2-Vision's. These tokens go into
`usage.prompt_tokens` (and `prompt_tokens_details.image_tokens`) and into the TPM reservation;
they do not count against the text context (images go to cross-attention).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL.Image import Image
from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

LLAMA_32_VISION_TILE = 560
LLAMA_32_VISION_MAX_TILES = 4
LLAMA_32_VISION_TOKENS_PER_TILE = 1601  # (560 / 14) ** 2 + 1


@dataclass(frozen=True)
class ImageTokenCounter:
    tile_size: int = LLAMA_32_VISION_TILE
    max_tiles: int = LLAMA_32_VISION_MAX_TILES
    tokens_per_tile: int = LLAMA_32_VISION_TOKENS_PER_TILE

    @classmethod
    def from_engine(cls, engine: Any) -> ImageTokenCounter:
        """From a loaded local engine's processor and model; Llama 3.2-Vision's otherwise
        (an upstream engine serves the real model)."""
        default = cls()
        processor = getattr(engine, "processor", None)
        model = getattr(engine, "model", None)
        image_processor = getattr(processor, "image_processor", None)
        vision = getattr(getattr(model, "config", None), "vision_config", None)
        if image_processor is None or vision is None:
            return default
        size = getattr(image_processor, "size", None)
        tile = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        patch = int(getattr(vision, "patch_size", 14))
        image_size = int(getattr(vision, "image_size", default.tile_size))
        return cls(
            tile_size=int(tile or image_size),
            max_tiles=int(getattr(image_processor, "max_image_tiles", default.max_tiles)),
            tokens_per_tile=(image_size // patch) ** 2 + 1,
        )

    def tiles(self, image: Image) -> int:
        height, width = get_optimal_tiled_canvas(
            image_height=image.height,
            image_width=image.width,
            max_image_tiles=self.max_tiles,
            tile_size=self.tile_size,
        )
        return int(height // self.tile_size) * int(width // self.tile_size)

    def count(self, images: Iterable[Image]) -> int:
        return sum(self.tiles(image) * self.tokens_per_tile for image in images)
