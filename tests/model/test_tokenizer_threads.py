"""Tokenizers shared across threads (issue 13, part 1).

A fast tokenizer keeps padding and truncation as mutable state on its Rust object: a padded
batch encode in one thread and a plain encode in another used to leave the batch unpadded
("expected sequence of length N at dim 1 (got M)"), failing ~1% of batched requests. These
tests drive the real engines on the demo model's real processor with real threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from model.engine import ChatTurn, EngineRequest, ImagePart, SamplingParams, TextPart
from model.fast import FastMllamaEngine
from model.local_engine import LocalMllamaEngine
from tests.model.fast_support import run

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "birds",
    "sing",
]


def text_request(rid: str, words: int, max_tokens: int = 3) -> EngineRequest:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return EngineRequest(rid, (ChatTurn("user", (TextPart(text),)),), params)


def image_request(rid: str, words: int, size: tuple[int, int]) -> EngineRequest:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    parts = (ImagePart(Image.new("RGB", size, (20, 120, 220))), TextPart(text))
    return EngineRequest(rid, (ChatTurn("user", parts),), SamplingParams(3, 0.0))


class Counters:
    """Threads that call `count_prompt_tokens` as fast as they can (as `asyncio.to_thread`
    does for every admitted request), recording any exception or wrong count."""

    def __init__(self, engine: LocalMllamaEngine | FastMllamaEngine, threads: int = 4) -> None:
        self.engine = engine
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.calls = 0
        probes = [text_request(f"probe{n}", n) for n in (1, 17, 90, 300)]
        self.expected = [(p, engine.count_prompt_tokens(p)) for p in probes]
        self.threads = [threading.Thread(target=self._count, daemon=True) for _ in range(threads)]

    def _count(self) -> None:
        while not self.stop.is_set():
            for probe, want in self.expected:
                try:
                    got = self.engine.count_prompt_tokens(probe)
                    if got != want:
                        raise AssertionError(f"counted {got} tokens, expected {want}")
                except BaseException as exc:
                    self.errors.append(exc)
                self.calls += 1

    def __enter__(self) -> Counters:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


async def _batches(
    engine: LocalMllamaEngine | FastMllamaEngine, rounds: int, lengths: tuple[int, ...]
) -> list[str]:
    """Rounds of concurrent requests of very different lengths; the errors they finished with."""
    errors: list[str] = []
    for r in range(rounds):
        reqs = [text_request(f"r{r}-{i}", words) for i, words in enumerate(lengths)]
        if r % 4 == 3:  # image batches go through the processor's image path as well
            reqs = [image_request(f"i{r}-{i}", 3 + 60 * i, (60 + 40 * i, 50)) for i in range(3)]
        results = await asyncio.gather(*(run(engine, q) for q in reqs))
        errors += [f.error or "" for _, f, _ in results if f.reason not in ("stop", "length")]
    return errors


@pytest.fixture(scope="module")
def local_engine(demo_model_dir: Path) -> Iterator[LocalMllamaEngine]:
    eng = LocalMllamaEngine(demo_model_dir, model_id="demo", device="cpu", max_batch_size=4)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


def test_batch_engine_survives_concurrent_token_counting(local_engine: LocalMllamaEngine) -> None:
    with Counters(local_engine) as counters:
        errors = asyncio.run(_batches(local_engine, rounds=24, lengths=(2, 40, 150, 400)))
    assert counters.calls > 100  # the counting threads really ran alongside the batches
    assert local_engine.scheduler.batches_run >= 24
    assert errors == []
    assert counters.errors == []


def test_fast_engine_survives_concurrent_token_counting(demo_model_dir: Path) -> None:
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from tests.model.fast_support import make_engine

    processor = AutoProcessor.from_pretrained(demo_model_dir)
    model = MllamaForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    engine = make_engine((model, processor))
    try:
        with Counters(engine) as counters:
            errors = asyncio.run(_batches(engine, rounds=8, lengths=(2, 30, 80, 150)))
        assert counters.calls > 50
        assert errors == []
        assert counters.errors == []
    finally:
        asyncio.run(engine.stop())
