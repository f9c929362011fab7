"""The fast engine (model/fast) against `model.generate` on the tiny demo Mllama, in float32.

Greedy references run transformers' `generate()` on each request alone, under
`transformers_row_mask_fix()` (huggingface/transformers#39379 fixed the way the fast forward
fixes it; it changes nothing for text-only requests, and for image requests only the tokens
before `<|image|>`). Token ids are compared exactly, logits with atol 1e-4.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, MllamaForConditionalGeneration

from model.engine import (
    ChatTurn,
    Engine,
    EngineEvent,
    EngineOverloaded,
    EngineRequest,
    Finished,
    ImagePart,
    SamplingParams,
    TextDelta,
    TextPart,
)
from model.fast import FastEngineConfig, FastMllamaEngine, RequestTooLarge
from model.fast.forward import FastForward, PrefillChunk, make_decode_inputs
from model.fast.graphs import DecodeGraphs
from model.fast.kv_cache import CacheGeometry, StaticKVCache, plan_slots
from model.fast.reference import transformers_row_mask_fix
from model.fast.sampling import SlotSampler
from model.fast.sequence import FastSequence
from model.prompt import render_prompt
from model.sampling import TokenSampler

# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> tuple[Any, Any]:
    processor = AutoProcessor.from_pretrained(demo_model_dir)
    model = MllamaForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    return model, processor


class Recorder:
    """Finished sequences by request id (the batcher's `on_finish` hook)."""

    def __init__(self) -> None:
        self.seqs: dict[str, FastSequence] = {}

    def __call__(self, seq: FastSequence) -> None:
        self.seqs[seq.request.request_id] = seq


def make_engine(loaded: tuple[Any, Any], **config: Any) -> FastMllamaEngine:
    model, processor = loaded
    settings = {"max_len": 512, "max_slots": 6, "max_images_per_request": 2, **config}
    engine = FastMllamaEngine.from_loaded(
        model, processor, model_id="demo", config=FastEngineConfig(**settings)
    )
    asyncio.run(engine.start())
    engine.batcher.on_finish = Recorder()
    return engine


@pytest.fixture(scope="module")
def engine(loaded: tuple[Any, Any]) -> Iterator[FastMllamaEngine]:
    eng = make_engine(loaded)
    yield eng
    asyncio.run(eng.stop())


def recorded(engine: FastMllamaEngine) -> dict[str, FastSequence]:
    hook = engine.batcher.on_finish
    assert isinstance(hook, Recorder)
    return hook.seqs


def image(color: tuple[int, int, int], size: tuple[int, int] = (90, 60)) -> Image.Image:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):
        img.putpixel((x, x % size[1]), (255 - color[0], 30, 200))
    return img


def request(text: str, *images: Image.Image, rid: str = "r", **sampling: Any) -> EngineRequest:
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in images), TextPart(text))
    params = {"max_tokens": 12, "temperature": 0.0, **sampling}
    return EngineRequest(rid, (ChatTurn("user", parts),), SamplingParams(**params))


async def run(engine: FastMllamaEngine, req: EngineRequest) -> tuple[str, Finished, list[str]]:
    deltas: list[str] = []
    async for event in engine.generate(req):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            return "".join(deltas), event, deltas
    raise AssertionError("no Finished event")


def stream_of(engine: FastMllamaEngine, req: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
    """The event stream as the async generator it is (closable)."""
    return cast(AsyncGenerator[EngineEvent, None], engine.generate(req))


async def together(engine: FastMllamaEngine, reqs: list[EngineRequest]) -> list[str]:
    """Submit all requests so that they are admitted at the same step."""
    batcher = engine.batcher
    batcher.pause()
    try:
        tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
        while batcher.waiting_count < len(reqs):
            await asyncio.sleep(0.001)
    finally:
        batcher.resume()
    return [text for text, _, _ in await asyncio.gather(*tasks)]


def reference_ids(loaded: tuple[Any, Any], req: EngineRequest) -> tuple[list[int], int]:
    """Greedy `generate()` on the request alone (with the #39379 fix): (new ids, prompt len)."""
    model, processor = loaded
    prompt, images = render_prompt(processor, req.messages)
    inputs = processor(
        text=[prompt],
        images=[images] if images else None,
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.inference_mode(), transformers_row_mask_fix():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=req.sampling.max_tokens, min_new_tokens=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist(), int(inputs["input_ids"].shape[1])


def assert_matches_reference(
    engine: FastMllamaEngine, loaded: tuple[Any, Any], req: EngineRequest, text: str
) -> None:
    seq = recorded(engine)[req.request_id]
    want, n_prompt = reference_ids(loaded, req)
    assert seq.output_ids == want
    assert seq.prompt_tokens == n_prompt
    eos = engine.batcher.eos
    want_text = loaded[1].tokenizer.decode(
        [t for t in want if t not in eos], skip_special_tokens=True
    )
    assert text == want_text


TEXTS = [
    "Hello there, how are you today?",
    "Describe a quiet harbour at dawn in three short sentences please.",
    "2 + 2 =",
]
RED, GREEN, BLUE = (200, 30, 30), (10, 200, 90), (5, 5, 250)


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


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_buckets_and_static_buffers_give_the_same_tokens(
    loaded: tuple[Any, Any], compiled: bool
) -> None:
    """The CUDA-graph path without the capture (`static_decode_on_cpu`): rows padded to a
    bucket with idle rows, kv length to a power of two, vision to the slot's full capacity, and
    every input copied into one static buffer set per bucket; tokens still equal generate().
    Compiled: the same through `torch.compile(fullgraph=True)` (aot_eager: dynamo's trace and
    functionalization, as inductor gets them, without code generation)."""
    engine = make_engine(
        loaded,
        static_decode_on_cpu=True,
        graph_batch_sizes=(1, 2, 4),
        graph_min_kv_len=16,
        graph_warmup=False,  # buckets captured on first use: which ones is asserted below
        compile_decode=compiled,
        compile_backend="aot_eager",
    )
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        graphs = engine.graphs
        assert graphs is not None and not graphs.capture
        assert engine.info.extra["cuda_graphs"] == "false"  # nothing captured on the CPU
        reqs = [
            request(TEXTS[0], rid="g-t0"),
            request("What is in this picture?", image(RED), rid="g-i0"),
            request(TEXTS[1], rid="g-t1", max_tokens=20),
        ]
        texts = asyncio.run(together(engine, reqs))
        alone = request("Colour?", image(BLUE, (56, 56)), rid="g-i1", max_tokens=7)
        texts.append(asyncio.run(run(engine, alone))[0])
        for req, text in zip([*reqs, alone], texts, strict=True):
            assert_matches_reference(engine, loaded, req, text)
        buckets = graphs.captured
        max_vision = engine.batcher.cache.geometry.max_vision_tokens
        # 3 rows ran in the 4-row bucket (one idle row), 1 row alone in the 1-row bucket; the
        # kv lengths are powers of two (several of them); steps with an image used the full
        # vision width.
        assert {1, 4} <= {rows for rows, _, _ in buckets} <= {1, 2, 4}
        kv_lengths = {kv for _, kv, _ in buckets}
        assert len(kv_lengths) >= 2 and all(kv >= 16 and kv & (kv - 1) == 0 for kv in kv_lengths)
        assert {vision for _, _, vision in buckets} == {0, max_vision}
        # Every decode step went through the static path: the three requests were prefilled in
        # one step and then decoded side by side, the fourth alone.
        done = recorded(engine)
        batch_steps = max(done[r.request_id].completion_tokens for r in reqs) - 1
        assert graphs.replays == batch_steps + done["g-i1"].completion_tokens - 1
        # Compiled: one graph per bucket, none broken up (fullgraph), none run eagerly.
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiles
        assert compiled_graphs == (len(buckets) if compiled else 0)
    finally:
        asyncio.run(engine.stop())


def test_every_bucket_is_captured_at_start(loaded: tuple[Any, Any]) -> None:
    """`graph_warmup`: no step captures a bucket while serving (the streams would wait)."""
    engine = make_engine(loaded, static_decode_on_cpu=True, graph_batch_sizes=(1, 2, 4))
    try:
        graphs = engine.graphs
        assert graphs is not None
        max_vision = engine.batcher.cache.geometry.max_vision_tokens
        # Rows 1, 2, 4 and all 6 slots; kv 256 and the whole slot (512); vision or not.
        want = [
            (rows, kv, vision)
            for rows in (1, 2, 4, 6)
            for kv in (256, 512)
            for vision in (0, max_vision)
        ]
        assert graphs.captured == sorted(want) == sorted(graphs.all_buckets())
        reqs = [request(TEXTS[0], rid="w-t0"), request("Colour?", image(RED), rid="w-i0")]
        texts = asyncio.run(together(engine, reqs))
        assert graphs.replays > 0
        assert graphs.captured == sorted(want)  # nothing new while serving
        for req, text in zip(reqs, texts, strict=True):
            assert_matches_reference(engine, loaded, req, text)
    finally:
        asyncio.run(engine.stop())


def test_failed_graph_warmup_falls_back_to_eager_decode(loaded: tuple[Any, Any]) -> None:
    """A decode step that cannot be compiled (or captured) at start: the engine logs it, says
    why, and serves eagerly with the same tokens instead of failing to start."""

    def refusing_compiler(graph: Any, example_inputs: Any) -> Any:
        raise NotImplementedError("this compiler takes nothing")

    torch._dynamo.reset()  # a fresh cache: the decode step really goes to this compiler
    torch._dynamo.register_backend(refusing_compiler, name="test_refusing_compiler")
    engine = make_engine(
        loaded,
        static_decode_on_cpu=True,
        compile_decode=True,
        compile_backend="test_refusing_compiler",
    )
    try:
        assert engine.graphs is None and engine.batcher.graphs is None
        assert (
            engine.graph_error is not None and "this compiler takes nothing" in engine.graph_error
        )
        req = request(TEXTS[0], rid="fallback")
        text, finished, _ = asyncio.run(run(engine, req))
        assert finished.reason in ("stop", "length")
        assert_matches_reference(engine, loaded, req, text)
    finally:
        asyncio.run(engine.stop())


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
        with pytest.raises(RequestTooLarge):
            asyncio.run(run(eng, request(TEXTS[0], max_tokens=250)))
        with pytest.raises(RequestTooLarge):
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


# -- the forward itself: logits, chunking and the #39379 fix -------------------------------------


@pytest.fixture(scope="module")
def forward(loaded: tuple[Any, Any]) -> FastForward:
    model = loaded[0]
    geometry = CacheGeometry.from_model(model, max_len=256, max_images=1, dtype=torch.float32)
    return FastForward(model, StaticKVCache(geometry, slots=4, device=torch.device("cpu")))


def encode(loaded: tuple[Any, Any], text: str, *images: Image.Image) -> dict[str, torch.Tensor]:
    processor = loaded[1]
    turns = (ChatTurn("user", (*(ImagePart(i) for i in images), TextPart(text))),)
    prompt, imgs = render_prompt(processor, turns)
    return dict(
        processor(
            text=[prompt],
            images=[imgs] if imgs else None,
            add_special_tokens=False,
            return_tensors="pt",
        )
    )


def prefill(
    forward: FastForward, slot: int, inputs: dict[str, torch.Tensor], chunk: int = 10_000
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill one request into `slot` (in chunks); (last logits, decode vision mask)."""
    ids = inputs["input_ids"][0]
    vision = None
    decode_mask = None
    if "pixel_values" in inputs:
        states = forward.encode_images(
            inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
        )
        forward.write_cross_kv(slot, torch.cat(states))
        tiles = int(inputs["aspect_ratio_mask"][0, 0].sum())
        tile_mask = inputs["cross_attention_mask"][0, :, 0, :tiles].bool()
        vision = tile_mask.repeat_interleave(forward.tokens_per_tile, dim=1)
        decode_mask = vision[-1]
    logits = torch.empty(0)
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        piece = PrefillChunk(
            slot=slot,
            tokens=ids[start:end],
            start=start,
            vision_mask=vision[start:end] if vision is not None else None,
            want_logits=end == len(ids),
        )
        logits = forward.prefill([piece])
    return logits[0], decode_mask


def decode_step(
    forward: FastForward, rows: dict[int, tuple[int, int, torch.Tensor | None]]
) -> torch.Tensor:
    """One decode step for {slot: (token, position, vision mask)}; logits of rows 0..n-1."""
    for slot, (_, _, mask) in rows.items():
        forward.cache.set_vision_mask(slot, mask)
    inputs = make_decode_inputs(
        forward.cache,
        {slot: (token, pos) for slot, (token, pos, _) in rows.items()},
        n=max(rows) + 1,
        kv_len=max(pos for _, pos, _ in rows.values()) + 1,
        vision_len=max((m.shape[0] for _, _, m in rows.values() if m is not None), default=0),
    )
    return forward.decode(inputs)


@torch.inference_mode()
def test_prefill_and_decode_logits_equal_transformers(
    forward: FastForward, loaded: tuple[Any, Any]
) -> None:
    model = loaded[0]
    for slot, inputs in enumerate(
        [encode(loaded, TEXTS[1]), encode(loaded, "What is in this picture?", image(RED))]
    ):
        with transformers_row_mask_fix():
            out = model(**inputs, use_cache=True)
        ours, mask = prefill(forward, slot, inputs)
        assert torch.allclose(ours, out.logits[0, -1], atol=1e-4)
        # Chunked prefill (7 tokens a step) gives the same logits.
        chunked, _ = prefill(forward, slot + 2, inputs, chunk=7)
        assert torch.allclose(chunked, ours, atol=1e-4)
        # One decode step against transformers' cache.
        token = int(ours.argmax())
        step: dict[str, Any] = {"input_ids": torch.tensor([[token]]), "cache": out.cache}
        if "cross_attention_mask" in inputs:
            step["cross_attention_mask"] = inputs["cross_attention_mask"][:, -1:]
        with transformers_row_mask_fix():
            want = model(**step, use_cache=True).logits[0, -1]
        n_prompt = inputs["input_ids"].shape[1]
        got = decode_step(forward, {slot: (token, n_prompt, mask)})[slot]
        assert torch.allclose(got, want, atol=1e-4)


@torch.inference_mode()
def test_decode_traces_as_one_graph(forward: FastForward, loaded: tuple[Any, Any]) -> None:
    """No graph break in a decode step (a break is where a host sync or data-dependent Python
    would be, which a CUDA graph cannot hold), and the traced step writes the cache as eager."""
    inputs = encode(loaded, "What is in this picture?", image(GREEN))
    _, mask = prefill(forward, 0, inputs)
    forward.cache.set_vision_mask(0, mask)
    n_prompt = inputs["input_ids"].shape[1]
    step = make_decode_inputs(
        forward.cache,
        {0: (7, n_prompt)},
        n=2,
        kv_len=256,
        vision_len=forward.cache.geometry.max_vision_tokens,
    )
    layer = min(forward.cache.self_k)
    column = forward.cache.self_k[layer][0, :, n_prompt]
    want = forward.decode(step)
    written = column.clone()
    column.zero_()
    traced = torch.compile(forward.decode, fullgraph=True, dynamic=False, backend="aot_eager")
    got = traced(step)
    assert torch.allclose(got, want, atol=1e-5)
    assert written.abs().sum() > 0
    assert torch.equal(column, written)


def test_compiled_buckets_past_dynamos_recompile_limit(forward: FastForward) -> None:
    """More buckets than dynamo's default recompile limit (8), compiled from another thread
    than the one that built the graphs (as the engine's worker does; dynamo's config is
    thread-local): every bucket compiles, none fails or falls back."""
    graphs = DecodeGraphs(
        forward,
        batch_sizes=(1, 2, 3, 4),
        min_kv_len=16,
        compile_decode=True,
        compile_backend="aot_eager",
        capture=False,
    )
    keys = [graphs.bucket(rows, kv, 0) for rows in (1, 2, 3, 4) for kv in (16, 32, 64)]
    errors: list[BaseException] = []

    def warm() -> None:
        try:
            with torch.inference_mode():
                graphs.warmup(keys)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=warm)
    worker.start()
    worker.join()
    assert errors == []
    assert graphs.captured == sorted(keys) and len(keys) > 8
    step = make_decode_inputs(forward.cache, {0: (3, 5)}, n=4, kv_len=64, vision_len=0)
    other = make_decode_inputs(forward.cache, {0: (3, 5)}, n=1, kv_len=16, vision_len=0)
    with torch.inference_mode():
        got = graphs.run(step)
        assert torch.allclose(got, forward.decode(step), atol=1e-5)
        # Every bucket leaves its logits in the first rows of one shared buffer.
        again = graphs.run(other)
        assert again.data_ptr() == got.data_ptr() and again.shape[0] == 1
        assert torch.allclose(again, forward.decode(other), atol=1e-5)


@torch.inference_mode()
def test_text_row_batched_with_an_image_row_equals_alone(
    forward: FastForward, loaded: tuple[Any, Any]
) -> None:
    """The #39379 fix: our forward gives a text row the same logits next to an image row."""
    text_inputs = encode(loaded, TEXTS[0])
    image_inputs = encode(loaded, "What is in this picture?", image(RED))
    alone, _ = prefill(forward, 0, text_inputs)
    n_text = text_inputs["input_ids"].shape[1]
    alone_next = decode_step(forward, {0: (5, n_text, None)})[0]
    # Now slot 1 holds an image request; prefill both in one batch, then decode both.
    states = forward.encode_images(
        image_inputs["pixel_values"],
        image_inputs["aspect_ratio_ids"],
        image_inputs["aspect_ratio_mask"],
    )
    forward.write_cross_kv(1, torch.cat(states))
    tiles = int(image_inputs["aspect_ratio_mask"][0, 0].sum())
    vision = image_inputs["cross_attention_mask"][0, :, 0, :tiles].bool()
    vision = vision.repeat_interleave(forward.tokens_per_tile, dim=1)
    chunks = [
        PrefillChunk(0, text_inputs["input_ids"][0], 0, None, want_logits=True),
        PrefillChunk(1, image_inputs["input_ids"][0], 0, vision, want_logits=True),
    ]
    batched = forward.prefill(chunks)
    assert torch.allclose(batched[0], alone, atol=1e-4)
    n_image = image_inputs["input_ids"].shape[1]
    both = decode_step(forward, {0: (5, n_text, None), 1: (5, n_image, vision[-1])})
    assert torch.allclose(both[0], alone_next, atol=1e-4)


@torch.inference_mode()
def test_transformers_batches_text_with_images_differently(loaded: tuple[Any, Any]) -> None:
    """The bug itself: transformers' own forward changes a text row batched with an image row
    (and stops changing it once the fix is patched in)."""
    model, processor = loaded
    processor.tokenizer.padding_side = "left"
    prompts, images = [], []
    for turns in [
        (ChatTurn("user", (TextPart(TEXTS[0]),)),),
        (ChatTurn("user", (ImagePart(image(RED)), TextPart("What is in this picture?"))),),
    ]:
        prompt, imgs = render_prompt(processor, turns)
        prompts.append(prompt)
        images.append(imgs)
    batch = processor(
        text=prompts, images=images, padding=True, add_special_tokens=False, return_tensors="pt"
    )
    alone = processor(text=prompts[:1], add_special_tokens=False, return_tensors="pt")
    want = model(**alone).logits[0, -1]
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    buggy = model(**batch, position_ids=position_ids).logits[0, -1]
    with transformers_row_mask_fix():
        fixed = model(**batch, position_ids=position_ids).logits[0, -1]
    assert (buggy - want).abs().max() > 1e-2
    assert torch.allclose(fixed, want, atol=1e-4)
