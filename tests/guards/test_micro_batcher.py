"""Micro-batching: concurrent calls share one call of the batch function, in a worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from guards.base import Guard, GuardInput, GuardVerdict
from guards.micro_batcher import BatchingGuard, MicroBatcher
from model.engine import ChatTurn, TextPart


def _double(items: list[int]) -> list[int]:
    return [2 * x for x in items]


async def test_ten_concurrent_calls_make_one_batch_and_each_gets_its_own_result() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(_double, max_batch=16, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
    assert results == [[2 * i] for i in range(10)]
    assert batcher.calls == 1 < 10
    assert list(batcher.batch_sizes) == [10]
    batcher.close()


async def test_max_batch_splits_the_queue() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(_double, max_batch=4, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
    assert results == [[2 * i] for i in range(10)]
    assert list(batcher.batch_sizes) == [4, 4, 2]
    assert batcher.calls == 3
    batcher.close()


async def test_a_caller_with_several_items_gets_them_back_in_order() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(_double, max_batch=8, max_wait_s=0.05)
    a, b, c = await asyncio.gather(
        batcher.submit([1, 2, 3]), batcher.submit([10]), batcher.submit([7, 8])
    )
    assert (a, b, c) == ([2, 4, 6], [20], [14, 16])
    assert batcher.calls == 1
    assert await batcher.submit([]) == []
    batcher.close()


async def test_errors_reach_every_waiting_caller_and_the_next_batch_still_runs() -> None:
    fail = {"on": True}

    def fn(items: list[int]) -> list[int]:
        if fail["on"]:
            raise RuntimeError("model exploded")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch=8, max_wait_s=0.02)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    assert batcher.calls == 1
    fail["on"] = False
    assert await batcher.submit([42]) == [42]
    batcher.close()


async def test_a_wrong_number_of_results_is_an_error() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items[:1], max_wait_s=0.02)
    results = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "2 items" in str(r) for r in results)
    batcher.close()


async def test_model_work_runs_in_a_worker_thread_and_the_loop_keeps_running() -> None:
    seen: list[int] = []

    def slow(items: list[int]) -> list[int]:
        seen.append(threading.get_ident())
        time.sleep(0.3)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(slow, max_wait_s=0.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    assert await batcher.submit([1]) == [1]
    task.cancel()
    assert seen and seen[0] != threading.get_ident()
    assert ticks >= 5  # the event loop was not blocked while the batch ran
    batcher.close()


async def test_arrivals_during_a_running_batch_form_the_next_batch() -> None:
    started = threading.Event()

    def slow(items: list[int]) -> list[int]:
        started.set()
        time.sleep(0.2)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(slow, max_batch=16, max_wait_s=0.0)
    first = asyncio.create_task(batcher.submit([0]))
    while not started.is_set():
        await asyncio.sleep(0.005)
    rest = await asyncio.gather(*(batcher.submit([i]) for i in range(1, 6)))
    assert await first == [0]
    assert rest == [[i] for i in range(1, 6)]
    assert list(batcher.batch_sizes) == [1, 5]
    batcher.close()


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(_double, max_batch=16, max_wait_s=0.05)
    doomed = asyncio.create_task(batcher.submit([1]))
    kept = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0)
    doomed.cancel()
    assert await kept == [4]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert list(batcher.batch_sizes) == [1]  # the cancelled item was not computed
    batcher.close()


def test_the_batcher_survives_a_new_event_loop() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(_double, max_wait_s=0.01)

    async def run(x: int) -> list[int]:
        return await batcher.submit([x])

    assert asyncio.run(run(1)) == [2]
    assert asyncio.run(run(2)) == [4]  # a second loop (as in per-test loops)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(run(3))


async def test_batching_guard_is_a_guard_and_sets_latency() -> None:
    def verdicts(items: list[GuardInput]) -> list[GuardVerdict]:
        return [GuardVerdict("echo", details={"text": it.text_to_check()}) for it in items]

    guard = BatchingGuard("echo", frozenset({"input"}), verdicts, max_wait_s=0.05)
    assert isinstance(guard, Guard)

    def item(text: str) -> GuardInput:
        return GuardInput("input", (ChatTurn("user", (TextPart(text),)),))

    out = await asyncio.gather(*(guard.check([item(f"t{i}")]) for i in range(10)))
    assert [v[0].details["text"] for v in out] == [f"t{i}" for i in range(10)]
    assert all(v[0].latency_s > 0 for v in out)
    assert guard.batcher.calls == 1
    guard.close()


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(_double, max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(_double, max_wait_s=-1)
