"""Logprobs from the engines equal log-softmax of the model's own logits, token by token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration

from model.engine import Engine, EngineRequest, TextDelta, TokenLogprob
from model.local_engine import LocalMllamaEngine
from model.prompt import render_prompt
from tests.model.fast_support import make_engine
from tests.model.test_local_engine import request


@pytest.fixture(scope="module", params=["batch", "fast"])
def any_engine(request: pytest.FixtureRequest, demo_model_dir: Path) -> Iterator[Any]:
    eng: Any
    if request.param == "batch":
        eng = LocalMllamaEngine(demo_model_dir, model_id="demo", device="cpu", max_batch_size=4)
        asyncio.run(eng.start())
    else:
        processor = AutoProcessor.from_pretrained(demo_model_dir)
        model = MllamaForConditionalGeneration.from_pretrained(demo_model_dir).eval()
        eng = make_engine((model, processor))
    yield eng
    asyncio.run(eng.stop())


def entries_of(engine: Engine, req: EngineRequest) -> tuple[str, list[TokenLogprob]]:
    async def collect() -> tuple[str, list[TokenLogprob]]:
        text, entries = "", []
        async for event in engine.generate(req):
            if isinstance(event, TextDelta):
                text += event.text
                entries += event.logprobs
        return text, entries

    return asyncio.run(collect())


def reference_logprobs(model: Any, processor: Any, req: EngineRequest, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes: log-softmax rows [steps, V]."""
    prompt, _ = render_prompt(processor, req.messages)
    ids = processor(text=[prompt], add_special_tokens=False, return_tensors="pt")["input_ids"]
    rows = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1].float()
            rows.append(torch.log_softmax(logits, dim=-1))
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=-1)
    return torch.stack(rows)


def test_greedy_logprobs_match_the_model(any_engine: Any) -> None:
    req = request("Tell me about the harbour.", max_tokens=8, top_logprobs=4)
    text, entries = entries_of(any_engine, req)
    assert len(entries) == 8
    want = reference_logprobs(any_engine.model, any_engine.processor, req, len(entries))
    tokenizer = any_engine.processor.tokenizer
    for entry, row in zip(entries, want, strict=True):
        top = torch.topk(row, 4)
        assert entry.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
        assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        top_text = [tokenizer.decode([int(i)]) for i in top.indices]
        assert entry.top[0].token == top_text[0] == entry.token
    assert "".join(e.token for e in entries) == text


def test_penalties_shift_the_reported_logprobs(any_engine: Any) -> None:
    """Logprobs are taken after the penalties that sampling used."""
    plain = entries_of(any_engine, request("Repeat: la la la", max_tokens=6, top_logprobs=0))[1]
    penalised = entries_of(
        any_engine,
        request("Repeat: la la la", max_tokens=6, top_logprobs=0, frequency_penalty=2.0),
    )[1]
    assert plain[0].logprob == pytest.approx(penalised[0].logprob, abs=1e-5)  # nothing seen yet
    assert [e.logprob for e in plain] != pytest.approx([e.logprob for e in penalised], abs=1e-3)
