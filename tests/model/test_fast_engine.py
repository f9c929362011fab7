"""The fast engine (model/fast) against `model.generate` on the tiny demo Mllama, in float32.

Greedy references run transformers' `generate()` on each request alone, under
`transformers_row_mask_fix()` (huggingface/transformers#39379 fixed the way the fast forward
fixes it; it changes nothing for text-only requests, and for image requests only the tokens
before `<|image|>`). Token ids are compared exactly, logits with atol 1e-4.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from model.engine import (
    ChatTurn,
    Engine,
    EngineRequest,
    Finished,
    ImagePart,
    SamplingParams,
    TextDelta,
    TextPart,
)
from model.errors import EngineOverloaded, RequestNeverFits
from model.fast import FastEngineConfig, FastMllamaEngine
from model.fast.kv_cache import CacheGeometry, plan_slots
from model.fast.sampling import SlotSampler
from model.prompt import render_prompt
from model.sampling import TokenSampler
from testkit.fast_reference import transformers_row_mask_fix
from tests.model.fast_support import (
    BLUE,
    GREEN,
    RED,
    TEXTS,
    assert_matches_reference,
    image,
    make_engine,
    recorded,
    request,
    run,
    stream_of,
    together,
)

# -- greedy equality with generate() -----------------------------------------------------------


def test_is_an_engine(engine: FastMllamaEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.ready()
    assert engine.info.context_length == 512
    assert engine.info.max_batch_size == 6
    assert engine.info.extra["engine"] == "fast"


@pytest.mark.parametrize("text", TEXTS)
def test_text_alone_equals_generate(
    engine: FastMllamaEngine, loaded: tuple[Any, Any], text: str
) -> None:
    req = request(text, rid=f"alone-{text}")
    got, finished, _ = asyncio.run(run(engine, req))
    assert_matches_reference(engine, loaded, req, got)
    assert finished.prompt_tokens == engine.count_prompt_tokens(req)


@pytest.mark.parametrize(
    "size", [(56, 56), (90, 60), (40, 130), (300, 80)], ids=["1tile", "2x2", "tall", "wide"]
)
def test_image_alone_equals_generate(
    engine: FastMllamaEngine, loaded: tuple[Any, Any], size: tuple[int, int]
) -> None:
    req = request("What is in this picture?", image(RED, size), rid=f"img-{size}")
    got, _, _ = asyncio.run(run(engine, req))
    assert_matches_reference(engine, loaded, req, got)


def test_two_images_in_one_request_equal_generate(
    engine: FastMllamaEngine, loaded: tuple[Any, Any]
) -> None:
    turns = (
        ChatTurn("user", (ImagePart(image(RED)), TextPart("First this,"))),
        ChatTurn("assistant", (TextPart("I see it."),)),
        ChatTurn("user", (ImagePart(image(BLUE, (300, 80))), TextPart("and now this one?"))),
    )
    req = EngineRequest("two-images", turns, SamplingParams(max_tokens=10, temperature=0.0))
    got, _, _ = asyncio.run(run(engine, req))
    assert_matches_reference(engine, loaded, req, got)


def test_transformers_without_the_fix_differs_on_image_requests(
    engine: FastMllamaEngine, loaded: tuple[Any, Any]
) -> None:
    """Why the references use the fix: unpatched transformers lets the tokens before <|image|>
    attend to the image (uniformly), which changes the answer of the demo model."""
    model, processor = loaded
    req = request("What is in this picture?", image(RED), rid="unfixed")
    prompt, images = render_prompt(processor, req.messages)
    inputs = processor(
        text=[prompt], images=[images], add_special_tokens=False, return_tensors="pt"
    )
    with torch.inference_mode():
        plain = model(**inputs).logits[0, -1]
        with transformers_row_mask_fix():
            fixed = model(**inputs).logits[0, -1]
    assert (plain - fixed).abs().max() > 1e-2


def test_mixed_batch_of_text_and_images_each_equal_alone(
    engine: FastMllamaEngine, loaded: tuple[Any, Any]
) -> None:
    reqs = [
        request(TEXTS[0], rid="mix-t0"),
        request("What is in this picture?", image(RED), rid="mix-i0"),
        request(TEXTS[1], rid="mix-t1", max_tokens=20),
        request("Tell me a story about it, with details", image(GREEN, (40, 130)), rid="mix-i1"),
        request("Colour?", image(BLUE, (56, 56)), rid="mix-i2", max_tokens=7),
        request(TEXTS[2], rid="mix-t2", max_tokens=5),
    ]
    texts = asyncio.run(together(engine, reqs))
    seqs = recorded(engine)
    # All admitted at the same step, so they decoded side by side.
    assert len({seqs[r.request_id].admitted_step for r in reqs}) == 1
    assert engine.batcher.max_running >= len(reqs)
    for req, text in zip(reqs, texts, strict=True):
        assert_matches_reference(engine, loaded, req, text)


def test_request_joins_mid_flight(engine: FastMllamaEngine, loaded: tuple[Any, Any]) -> None:
    first = request(TEXTS[1], rid="join-a", max_tokens=60)
    second = request("What is in this picture?", image(GREEN), rid="join-b", max_tokens=8)
    # Slow the steps down a little so that the first request is surely still decoding.
    engine.batcher.on_step = lambda _: time.sleep(0.003)

    async def scenario() -> tuple[str, str]:
        task_a = asyncio.create_task(run(engine, first))
        seqs = engine.batcher._running
        while not any(s.request is first and s.completion_tokens >= 3 for s in seqs):
            await asyncio.sleep(0.001)
        text_b, _, _ = await run(engine, second)
        text_a, _, _ = await task_a
        return text_a, text_b

    try:
        text_a, text_b = asyncio.run(scenario())
    finally:
        engine.batcher.on_step = None
    a, b = recorded(engine)["join-a"], recorded(engine)["join-b"]
    assert a.first_token_step is not None and b.first_token_step is not None
    assert a.finish_step is not None and b.admitted_step is not None
    # The second joined while the first was decoding, and streamed before the first finished.
    assert a.first_token_step < b.admitted_step
    assert b.first_token_step < a.finish_step
    assert_matches_reference(engine, loaded, first, text_a)
    assert_matches_reference(engine, loaded, second, text_b)


# -- stop strings, length, chunked prefill, cancellation, overload ------------------------------


def test_stop_string_cuts_the_text(engine: FastMllamaEngine) -> None:
    full, _, _ = asyncio.run(run(engine, request(TEXTS[1], max_tokens=30)))
    assert len(full) > 12
    stop = full[6:9]
    cut = full[: full.index(stop)]
    got, finished, deltas = asyncio.run(run(engine, request(TEXTS[1], max_tokens=30, stop=(stop,))))
    assert got == cut
    assert finished.reason == "stop"
    assert all(stop not in d for d in deltas)


def test_max_tokens_gives_length(engine: FastMllamaEngine) -> None:
    _, unconstrained, _ = asyncio.run(run(engine, request(TEXTS[1], max_tokens=20)))
    assert unconstrained.completion_tokens > 3
    before = engine.batcher.tokens_out
    _, finished, _ = asyncio.run(run(engine, request(TEXTS[1], max_tokens=3)))
    assert finished.reason == "length"
    assert finished.completion_tokens == 3
    assert engine.batcher.tokens_out == before + 3  # the throughput counter of the benchmark


def test_long_prompt_prefilled_in_chunks(loaded: tuple[Any, Any]) -> None:
    eng = make_engine(loaded, prefill_chunk_tokens=16, max_prefill_seqs=2)
    try:
        running = request(TEXTS[0], rid="chunk-run", max_tokens=40)
        long_text = " ".join(["The gateway checks every request and streams the answer."] * 8)
        long_req = request(long_text, image(BLUE), rid="chunk-long", max_tokens=10)
        progress: dict[int, int] = {}

        def watch(batcher: Any) -> None:
            time.sleep(0.002)
            for s in batcher._running:
                if s.request is running:
                    progress[batcher.steps] = s.completion_tokens

        eng.batcher.on_step = watch

        async def scenario() -> tuple[str, str]:
            task = asyncio.create_task(run(eng, running))
            while not progress or max(progress.values()) < 2:
                await asyncio.sleep(0.001)
            long_out, _, _ = await run(eng, long_req)
            return (await task)[0], long_out

        text_run, text_long = asyncio.run(scenario())
        seqs = recorded(eng)
        long_seq = seqs["chunk-long"]
        assert long_seq.prompt_tokens > 80
        assert long_seq.prefill_chunks == -(-long_seq.prompt_tokens // 16)
        # The running stream kept decoding while the long prompt was being prefilled.
        assert long_seq.admitted_step is not None and long_seq.first_token_step is not None
        during = [
            n
            for step, n in progress.items()
            if long_seq.admitted_step <= step < long_seq.first_token_step
        ]
        assert len(set(during)) >= 3
        assert_matches_reference(eng, loaded, long_req, text_long)
        assert_matches_reference(eng, loaded, running, text_run)
    finally:
        asyncio.run(eng.stop())


def test_cancel_frees_the_slot(engine: FastMllamaEngine) -> None:
    async def scenario() -> tuple[int, int]:
        stream = stream_of(engine, request(TEXTS[1], max_tokens=400, rid="cancel"))
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()  # the client went away
        for _ in range(500):
            if engine.batcher.active_count == 0:
                break
            await asyncio.sleep(0.002)
        active = engine.batcher.active_count
        await run(engine, request("after", max_tokens=4))
        return active, engine.batcher.cache.free_slots

    active, free = asyncio.run(scenario())
    assert active == 0
    assert free == engine.batcher.cache.slots


def test_refused_when_no_slot_is_free(loaded: tuple[Any, Any]) -> None:
    model = loaded[0]
    geometry = CacheGeometry.from_model(model, max_len=256, max_images=1, dtype=torch.float32)
    budget = geometry.bytes_per_slot + geometry.bytes_per_slot // 2  # pays for one slot
    assert plan_slots(geometry, budget, max_slots=8) == 1
    eng = make_engine(
        loaded, max_len=256, max_images_per_request=1, memory_budget_bytes=budget, max_waiting=0
    )
    try:
        assert eng.info.max_batch_size == 1

        async def scenario() -> tuple[Finished, str]:
            busy = stream_of(eng, request(TEXTS[0], rid="busy", max_tokens=150))
            await busy.__anext__()  # it holds the only slot now
            with pytest.raises(EngineOverloaded):
                await run(eng, request(TEXTS[2], rid="refused"))
            await busy.aclose()
            for _ in range(500):  # the slot comes back at the next step
                if eng.batcher.cache.free_slots:
                    break
                await asyncio.sleep(0.002)
            text, finished, _ = await run(eng, request(TEXTS[2], rid="later", max_tokens=4))
            return finished, text

        finished, _ = asyncio.run(scenario())
        assert finished.reason == "length"
        # Bigger than a slot: refused at once, whatever is free.
        with pytest.raises(RequestNeverFits):
            asyncio.run(run(eng, request(TEXTS[0], max_tokens=250)))
        with pytest.raises(RequestNeverFits):
            asyncio.run(run(eng, request("two?", image(RED), image(BLUE))))
    finally:
        asyncio.run(eng.stop())


def test_no_slot_budget_fails_at_start(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    eng = FastMllamaEngine.from_loaded(
        model, processor, model_id="demo", config=FastEngineConfig(memory_budget_bytes=1000)
    )
    with pytest.raises(Exception, match="pays for no slot"):
        asyncio.run(eng.start())


# -- sampling -------------------------------------------------------------------------------------


def test_seeded_sampling_same_alone_and_batched(engine: FastMllamaEngine) -> None:
    def seeded(rid: str, seed: int = 42) -> EngineRequest:
        return request(TEXTS[2], rid=rid, temperature=0.9, top_p=0.95, seed=seed, max_tokens=12)

    alone = asyncio.run(run(engine, seeded("s-alone")))[0]
    batched = asyncio.run(
        together(
            engine,
            [
                request(TEXTS[0], rid="s-o1", temperature=1.0, max_tokens=15),
                request("Colour?", image(RED), rid="s-o2", temperature=0.7, seed=1),
                seeded("s-batched"),
                request(TEXTS[1], rid="s-o3", presence_penalty=1.0, frequency_penalty=0.5),
            ],
        )
    )
    assert batched[2] == alone
    assert recorded(engine)["s-batched"].output_ids == recorded(engine)["s-alone"].output_ids
    others = {asyncio.run(run(engine, seeded(f"s-{s}", seed=s)))[0] for s in range(4)}
    assert len(others) > 1


def test_sampler_follows_token_sampler_rules() -> None:
    vocab = 6
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    params = SamplingParams(max_tokens=5, temperature=0.0, presence_penalty=2.0)
    sampler = SlotSampler(slots=1, vocab_size=vocab, device=torch.device("cpu"))
    sampler.reset(0, params)
    reference = TokenSampler(params, vocab)
    for _ in range(4):  # greedy with penalties: the same choices as TokenSampler
        got = sampler.sample(logits[None], [0])[0]
        want = reference.sample(logits)
        reference.observe(want)
        assert got == want
    # top_p keeps the smallest set reaching it: with p = 0.7 only tokens 5 and 0 can come out.
    n = 2000
    nucleus = SlotSampler(slots=n, vocab_size=vocab, device=torch.device("cpu"))
    plain = SlotSampler(slots=n, vocab_size=vocab, device=torch.device("cpu"))
    for slot in range(n):
        nucleus.reset(slot, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=slot))
        plain.reset(slot, SamplingParams(max_tokens=1, temperature=1.0, seed=slot))
    rows = logits[None].expand(n, vocab)
    assert set(nucleus.sample(rows, list(range(n)))) == {0, 5}
    counts = torch.bincount(torch.tensor(plain.sample(rows, list(range(n)))), minlength=vocab)
    assert torch.allclose(counts / n, torch.softmax(logits, -1), atol=0.04)
    # A seeded row draws the same token wherever it sits in the batch.
    solo = SlotSampler(slots=3, vocab_size=vocab, device=torch.device("cpu"))
    for slot in range(3):
        solo.reset(slot, SamplingParams(max_tokens=1, temperature=1.0, seed=slot + 10))
    together_ = solo.sample(rows[:3], [0, 1, 2])
    solo.reset(2, SamplingParams(max_tokens=1, temperature=1.0, seed=12))
    assert solo.sample(rows[:1], [2]) == [together_[2]]


# -- image cache ---------------------------------------------------------------------------------


def test_repeated_image_skips_the_encoder(engine: FastMllamaEngine) -> None:
    cache = engine.batcher.image_cache
    assert cache is not None
    img = image((123, 45, 67), (70, 90))
    first = asyncio.run(run(engine, request("Describe.", img, rid="cache-1")))[0]
    misses, hits = cache.misses, cache.hits
    second = asyncio.run(run(engine, request("Describe.", img.copy(), rid="cache-2")))[0]
    assert (cache.misses, cache.hits) == (misses, hits + 1)
    assert first == second
