"""Image tokens: the processor's tile count times the vision tokens per tile."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor, MllamaConfig

from gateway.image_tokens import ImageTokenCounter


class _Engine:
    def __init__(self, path: Path) -> None:
        self.processor = AutoProcessor.from_pretrained(path)

        class _Model:
            config = MllamaConfig.from_pretrained(path)

        self.model = _Model()


@pytest.mark.parametrize("size", [(64, 48), (56, 56), (300, 40), (40, 300), (1000, 900), (5, 5)])
def test_tiles_match_the_processor(demo_model_dir: Path, size: tuple[int, int]) -> None:
    engine = _Engine(demo_model_dir)
    counter = ImageTokenCounter.from_engine(engine)
    image = Image.new("RGB", size, (10, 20, 30))
    num_tiles = engine.processor.image_processor(images=[[image]])["num_tiles"][0][0]
    assert counter.tiles(image) == num_tiles
    vision = engine.model.config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
    assert counter.count([image, image]) == 2 * num_tiles * per_tile


def test_llama_32_vision_defaults() -> None:
    counter = ImageTokenCounter.from_engine(object())  # an upstream engine: the real model's
    assert counter.tokens_per_tile == 1601
    assert counter.count([Image.new("RGB", (1120, 1120))]) == 4 * 1601  # 2x2 tiles: 6404
    assert counter.count([Image.new("RGB", (560, 560))]) == 1601
