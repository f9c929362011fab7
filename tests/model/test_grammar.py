"""Grammar-constrained JSON on the batch engine: the tiny model's free output is gibberish, so
every valid object below is the constraint's doing."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from transformers import AutoProcessor, MllamaForConditionalGeneration

from model.engine import Engine, EngineRequest, Finished, TextDelta
from model.fast import FastMllamaEngine
from model.local_engine import LocalMllamaEngine
from model.schema_check import JSON_OBJECT_SCHEMA, SchemaError, canonical_schema
from tests.model.fast_support import make_engine, run, together
from tests.model.test_local_engine import image, request

SCHEMAS: dict[str, dict[str, Any]] = {
    "invoice": {
        "type": "object",
        "properties": {
            "number": {"type": "string", "maxLength": 8},
            "total": {"type": "integer", "minimum": 0, "maximum": 999},
            "paid": {"type": "boolean"},
            "currency": {"enum": ["EUR", "USD", "GBP"]},
        },
        "required": ["number", "total", "paid", "currency"],
        "additionalProperties": False,
    },
    "nested": {
        "$defs": {
            "line": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
                "required": ["sku"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "maxItems": 2},
            "note": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
        },
        "required": ["lines", "note"],
        "additionalProperties": False,
    },
    "json_object": json.loads(JSON_OBJECT_SCHEMA),
}


@pytest.fixture(scope="module", params=["batch", "fast"])
def engine(request: pytest.FixtureRequest, demo_model_dir: Path) -> Iterator[Engine]:
    """Both local engines: the batching scheduler and the continuous-batching fast engine."""
    eng: Engine
    if request.param == "batch":
        eng = LocalMllamaEngine(demo_model_dir, model_id="demo", device="cpu", max_batch_size=8)
        asyncio.run(eng.start())
    else:
        processor = AutoProcessor.from_pretrained(demo_model_dir)
        model = MllamaForConditionalGeneration.from_pretrained(demo_model_dir).eval()
        eng = make_engine((model, processor), max_slots=8)
    yield eng
    asyncio.run(eng.stop())


def constrained(name: str, seed: int, **kw: Any) -> EngineRequest:
    params: dict[str, Any] = {
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 60,
        "json_schema": canonical_schema(SCHEMAS[name]),
    }
    params.update(kw)
    return request("Return the invoice fields as JSON.", rid=f"{name}-{seed}", **params)


def outside_strings(text: str) -> str:
    """The characters of a JSON text that are not inside a string literal."""
    out, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        else:
            out.append(ch)
    return "".join(out)


async def _all(engine: Engine, reqs: list[EngineRequest]) -> list[tuple[str, Finished]]:
    results = await asyncio.gather(*(run(engine, r) for r in reqs))
    return [(text, fin) for text, fin, _ in results]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_seeded_samples_always_validate(engine: Engine, name: str) -> None:
    # Constrained rows share batches with free rows (every third request is free).
    reqs = [
        constrained(name, seed, max_tokens=400 if name == "json_object" else 60)
        if seed % 3
        else request("Say anything.", rid=f"free-{seed}")
        for seed in range(24)
    ]
    results = asyncio.run(_all(engine, reqs))
    stopped = 0
    for req, (text, finished) in zip(reqs, results, strict=True):
        if req.sampling.json_schema is None:
            continue
        assert finished.reason in ("stop", "length")
        if finished.reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text), SCHEMAS[name])
            assert not any(c.isspace() for c in outside_strings(text)), text
    # Bounded schemas mostly finish within 60 tokens; a free-form object rarely does at random.
    assert stopped >= (1 if name == "json_object" else 8)


def test_free_output_is_not_json(engine: Engine) -> None:
    """Without the grammar the same seeds give text that does not parse: a strong test."""
    reqs = [constrained("invoice", seed, json_schema=None) for seed in range(6)]
    for text, _ in asyncio.run(_all(engine, reqs)):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_length_gives_a_prefix_of_the_constrained_output(engine: Engine) -> None:
    full, finished = asyncio.run(_all(engine, [constrained("invoice", 5)]))[0]
    assert finished.reason == "stop"
    cut, cut_finished = asyncio.run(_all(engine, [constrained("invoice", 5, max_tokens=6)]))[0]
    assert cut_finished.reason == "length"
    assert full.startswith(cut) and cut != full


def test_constrained_rows_batched_equal_alone(engine: Engine) -> None:
    """Greedy rows with and without a grammar, text and image: each as it is alone."""
    schema = canonical_schema(SCHEMAS["invoice"])
    reqs = [
        request("Fields?", rid="g0", json_schema=schema, max_tokens=40),
        request("Say anything.", rid="g1", max_tokens=20),
        request("What is in it?", image((200, 30, 30)), rid="g2", json_schema=schema),
        request("Colour?", image((5, 5, 250)), rid="g3", max_tokens=10),
        request("Nested?", rid="g4", json_schema=canonical_schema(SCHEMAS["nested"])),
    ]
    alone = [asyncio.run(_all(engine, [r]))[0][0] for r in reqs]
    assert asyncio.run(_together(engine, reqs)) == alone


async def _together(engine: Engine, reqs: list[EngineRequest]) -> list[str]:
    """Run `reqs` in the same batch(es): the fast engine admits them at one step; the batch
    engine is kept busy by a long request while they queue (then text and image batches)."""
    if isinstance(engine, FastMllamaEngine):
        return await together(engine, reqs)
    assert isinstance(engine, LocalMllamaEngine)
    blocker = asyncio.create_task(run(engine, request("block", rid="blocker", max_tokens=60)))
    while engine.scheduler.active_count == 0:
        await asyncio.sleep(0.001)
    tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
    while engine.scheduler.pending_count < len(reqs):
        await asyncio.sleep(0.001)
    # All queued at once: the worker then takes the text rows as one batch, the image rows next.
    await blocker
    results = [text for text, _, _ in await asyncio.gather(*tasks)]
    assert engine.scheduler.last_batch_size == sum(1 for r in reqs if r.images)
    return results


def test_many_new_schemas_at_once(engine: Engine) -> None:
    """Concurrent first compiles of distinct schemas (worker threads), each output valid."""
    schemas = [
        {
            "type": "object",
            "properties": {f"k{i}": {"type": "integer", "minimum": 0, "maximum": i}},
            "required": [f"k{i}"],
            "additionalProperties": False,
        }
        for i in range(1, 9)
    ]
    reqs = [
        request("Go", rid=f"many-{i}", json_schema=canonical_schema(s), max_tokens=30)
        for i, s in enumerate(schemas)
    ]
    for schema, (text, finished) in zip(schemas, asyncio.run(_all(engine, reqs)), strict=True):
        assert finished.reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_deltas_carry_logprobs_of_their_tokens(engine: Engine) -> None:
    req = constrained("invoice", 3, top_logprobs=5)

    async def collect() -> list[TextDelta]:
        return [e async for e in engine.generate(req) if isinstance(e, TextDelta)]

    deltas = asyncio.run(collect())
    entries = [lp for d in deltas for lp in d.logprobs]
    assert b"".join(bytes(e.bytes) for e in entries).decode() == "".join(d.text for d in deltas)
    for entry in entries:
        # The sampled token was allowed: a finite logprob, never the -9999 of a masked one.
        assert -9999.0 < entry.logprob <= 0.0
        assert 1 <= len(entry.top) <= 5
        assert entry.logprob <= entry.top[0].logprob + 1e-6
        assert sum(math.exp(t.logprob) for t in entry.top) <= 1.0 + 1e-5


def test_unsupported_features_are_named() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "uniqueItems": True},
            "when": {"type": "string", "format": "date"},
        },
        "not": {"required": ["x"]},
    }
    with pytest.raises(SchemaError) as err:
        canonical_schema(schema)
    message = str(err.value)
    for what in ("'uniqueItems' at #/properties/tags", "'format' at #/properties/when", "'not'"):
        assert what in message


def test_schema_that_cannot_compile_is_refused() -> None:
    with pytest.raises(SchemaError, match="cannot be compiled"):
        canonical_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})


def test_canonical_text_is_key_order_independent() -> None:
    a = canonical_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = canonical_schema({"properties": {"x": {"type": "integer"}}, "type": "object"})
    assert a == b
