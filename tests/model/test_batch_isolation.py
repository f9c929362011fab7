"""One request's failure never fails its batch-mates (issue 13, part 1), on the real engine.

The failures are real: an image the real image processor cannot take, and a row whose token id
is outside the real model's embedding table (its forward pass raises for the whole batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from model.encoding import EncodedPrompt
from model.engine import (
    ChatTurn,
    EngineRequest,
    Finished,
    ImagePart,
    SamplingParams,
    TextDelta,
    TextPart,
)
from model.local_engine import LocalMllamaEngine
from model.scheduler import ScheduledRequest
from tests.model.fast_support import run


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> Iterator[LocalMllamaEngine]:
    eng = LocalMllamaEngine(demo_model_dir, model_id="demo", device="cpu", max_batch_size=4)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


def request(rid: str, text: str, img: Image.Image | None = None) -> EngineRequest:
    parts: tuple[TextPart | ImagePart, ...] = (TextPart(text),)
    if img is not None:
        parts = (ImagePart(img), TextPart(text))
    return EngineRequest(rid, (ChatTurn("user", parts),), SamplingParams(6, temperature=0.0))


def picture(color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (80, 50), color)
    img.putpixel((3, 4), (1, 2, 3))
    return img


async def _with_blocker(engine: LocalMllamaEngine, work: object) -> object:
    """Hold the worker with a long request so that what `work` submits queues as one batch."""
    blocker = asyncio.create_task(
        run(engine, EngineRequest("blocker", request("b", "block").messages, SamplingParams(40)))
    )
    while engine.scheduler.active_count == 0:
        await asyncio.sleep(0.001)
    result = await work  # type: ignore[misc]
    await blocker
    return result


def test_an_image_the_processor_refuses_fails_only_its_request(engine: LocalMllamaEngine) -> None:
    good = [
        request("g0", "What is this?", picture((200, 0, 0))),
        request("g1", "And?", picture((0, 0, 200))),
    ]
    bad = request("bad", "And this one?", Image.new("RGB", (0, 0)))  # the processor raises
    alone = [asyncio.run(run(engine, r))[0] for r in good]

    async def together() -> list[tuple[str, Finished, list[str]]]:
        return await asyncio.gather(*(run(engine, r) for r in [good[0], bad, good[1]]))

    results = asyncio.run(_with_blocker(engine, together()))
    assert engine.scheduler.last_batch_size == 3  # they really shared a batch
    (t0, f0, _), (_, fbad, dbad), (t1, f1, _) = results  # type: ignore[misc]
    assert {f0.reason, f1.reason} <= {"stop", "length"}
    assert [t0, t1] == alone
    assert fbad.reason == "error" and fbad.fault == "request" and dbad == []
    assert fbad.error and "image" in fbad.error


def test_a_batch_that_fails_in_the_model_is_retried_row_by_row(engine: LocalMllamaEngine) -> None:
    scheduler = engine.scheduler
    texts = ["Hello there, how are you?", "Describe a harbour at dawn, please, in detail."]
    alone = [asyncio.run(run(engine, request(f"a{i}", t)))[0] for i, t in enumerate(texts)]
    embeddings = engine.model.get_input_embeddings().num_embeddings

    async def together() -> list[list[object]]:
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[object]] = []
        seqs: list[ScheduledRequest] = []
        for i, text in enumerate([texts[0], "guilty", texts[1]]):
            req = request(f"row{i}", text)
            prompt, images = engine.renderer.render(req.messages)
            queue: asyncio.Queue[object] = asyncio.Queue()

            def emit(event: object, q: asyncio.Queue[object] = queue) -> None:
                loop.call_soon_threadsafe(q.put_nowait, event)

            seq = scheduler.new_sequence(req, prompt, images, emit)
            if text == "guilty":  # a token id the model's embedding table does not have
                ids = engine.encoder.encode(prompt, images).input_ids.clone()
                ids[-1] = embeddings + 5
                seq.encoded = EncodedPrompt(ids)
            queues.append(queue)
            seqs.append(seq)
        for seq in seqs:
            scheduler.submit(seq)
        out: list[list[object]] = []
        for queue in queues:
            events: list[object] = []
            while not events or not isinstance(events[-1], Finished):
                events.append(await queue.get())
            out.append(events)
        # One batch of the three, retried inside it (rows run alone do not take a new batch).
        # Not a count of batches_run: the blocker's batch may end before or after any read.
        assert scheduler.last_batch_size == 3
        return out

    first, guilty, last = asyncio.run(_with_blocker(engine, together()))  # type: ignore[misc]
    assert scheduler.last_batch_size == 3
    for events, want in [(first, alone[0]), (last, alone[1])]:
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == want
        assert events[-1].reason in ("stop", "length")  # type: ignore[union-attr]
    assert len(guilty) == 1 and isinstance(guilty[0], Finished)
    assert guilty[0].reason == "error" and guilty[0].fault == "server"
    assert "IndexError" in (guilty[0].error or "")  # the model's own failure, for the log
    # The engine goes on serving.
    assert asyncio.run(run(engine, request("after", texts[0])))[0] == alone[0]


def test_fast_engine_a_failing_newcomer_fails_alone(loaded: tuple[object, object]) -> None:
    from tests.model.fast_support import make_engine

    fast = make_engine(loaded)  # type: ignore[arg-type]
    try:
        texts = ["Hello there, how are you?", "Describe a harbour at dawn, please, in detail."]
        alone = [asyncio.run(run(fast, request(f"a{i}", t)))[0] for i, t in enumerate(texts)]
        embeddings = fast.model.get_input_embeddings().num_embeddings

        async def together() -> list[list[object]]:
            loop = asyncio.get_running_loop()
            batcher = fast.batcher
            out: list[asyncio.Queue[object]] = []
            batcher.pause()  # all three are admitted and prefilled in the same step
            try:
                for i, text in enumerate([texts[0], "guilty", texts[1]]):
                    req = request(f"f{i}", text)
                    prompt, images = fast.encoder.render(req.messages)
                    ids, _, _ = fast.prepare(prompt, images)
                    if text == "guilty":  # a token id the model's embedding table does not have
                        ids = ids.clone()
                        ids[-1] = embeddings + 5
                    queue: asyncio.Queue[object] = asyncio.Queue()

                    def emit(event: object, q: asyncio.Queue[object] = queue) -> None:
                        loop.call_soon_threadsafe(q.put_nowait, event)

                    batcher.submit(batcher.new_sequence(req, ids, emit))
                    out.append(queue)
            finally:
                batcher.resume()
            results: list[list[object]] = []
            for queue in out:
                events: list[object] = []
                while not events or not isinstance(events[-1], Finished):
                    events.append(await queue.get())
                results.append(events)
            return results

        first, guilty, last = asyncio.run(together())
        for events, want in [(first, alone[0]), (last, alone[1])]:
            assert "".join(e.text for e in events if isinstance(e, TextDelta)) == want
        assert len(guilty) == 1 and isinstance(guilty[0], Finished)
        assert guilty[0].reason == "error" and "IndexError" in (guilty[0].error or "")
        assert asyncio.run(run(fast, request("after", texts[0])))[0] == alone[0]
    finally:
        asyncio.run(fast.stop())
