"""Fixtures of the fast engine tests (modules that define their own `engine` or `loaded`
fixture, e.g. test_local_engine, keep theirs)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration

from model.fast import FastMllamaEngine
from model.fast.forward import FastForward
from model.fast.kv_cache import CacheGeometry, StaticKVCache
from tests.model.fast_support import make_engine


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> tuple[Any, Any]:
    processor = AutoProcessor.from_pretrained(demo_model_dir)
    model = MllamaForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    return model, processor


@pytest.fixture(scope="module")
def engine(loaded: tuple[Any, Any]) -> Iterator[FastMllamaEngine]:
    eng = make_engine(loaded)
    yield eng
    asyncio.run(eng.stop())


@pytest.fixture(scope="module")
def forward(loaded: tuple[Any, Any]) -> FastForward:
    model = loaded[0]
    geometry = CacheGeometry.from_model(model, max_len=256, max_images=1, dtype=torch.float32)
    return FastForward(model, StaticKVCache(geometry, slots=4, device=torch.device("cpu")))
