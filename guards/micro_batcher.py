"""Micro-batching for guard models: requests that arrive together share one forward pass.

`MicroBatcher` wraps a synchronous batch function `fn(items) -> results` (one result per item,
in order). Concurrent `submit()` calls are collected for a short window (`max_wait_s`, 5 ms by
default) or until `max_batch` items wait, then merged into one call of `fn`, which runs in a
dedicated single worker thread, so that model work never blocks the event loop and one model is
never driven by two threads at once. Each caller gets back exactly its own results. While a batch
runs, new arrivals queue up and form the next batch as soon as the worker is free.

If `fn` raises (or returns the wrong number of results), every caller of that batch gets the
exception; the guard pipeline turns it into an error verdict. A caller that is cancelled while
waiting simply drops its results.

`BatchingGuard` is a ready-made `Guard` around a batch function; `PromptGuard` and `LlamaGuard`
are `BatchingGuard`s around their `classify_batch`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from guards.base import Guard, GuardInput, GuardVerdict, Stage

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Entry(Generic[T, R]):
    items: list[T]
    future: asyncio.Future[list[R]]
    loop: asyncio.AbstractEventLoop = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """Merge concurrent `submit()` calls into batched calls of `fn`, run in one worker thread."""

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        name: str = "guard",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{name}-batch"
        )
        self._pending: deque[_Entry[T, R]] = deque()
        self._pending_items = 0
        self._timer: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # counters are read from other threads (metrics, tests)
        self.calls = 0  # how many times `fn` ran
        self.items_processed = 0
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # items per call, most recent last
        self._closed = False

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue `items`; return their results once the batch that carries them has run."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests, restarts): forget the old one's state
            self._reset(loop)
        future: asyncio.Future[list[R]] = loop.create_future()
        self._pending.append(_Entry(list(items), future, loop))
        self._pending_items += len(items)
        if self._pending_items >= self.max_batch or self.max_wait_s == 0:
            self._start_drain()
        elif self._timer is None and self._drainer is None:
            self._timer = loop.call_later(self.max_wait_s, self._start_drain)
        return await future

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending.clear()
        self._pending_items = 0
        self._timer = None
        self._drainer = None

    def _start_drain(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drainer is None and self._loop is not None:
            self._drainer = self._loop.create_task(self._drain())

    def _take_batch(self) -> list[_Entry[T, R]]:
        batch: list[_Entry[T, R]] = []
        count = 0
        while self._pending:
            entry = self._pending[0]
            if entry.future.done():  # cancelled while waiting: nothing to compute
                self._pending.popleft()
                self._pending_items -= len(entry.items)
                continue
            if batch and count + len(entry.items) > self.max_batch:
                break
            self._pending.popleft()
            self._pending_items -= len(entry.items)
            batch.append(entry)
            count += len(entry.items)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    return
                items = [item for entry in batch for item in entry.items]
                try:
                    results = await loop.run_in_executor(self._executor, self._call, items)
                    if len(results) != len(items):
                        raise RuntimeError(
                            f"batch function returned {len(results)} results for {len(items)} items"
                        )
                except asyncio.CancelledError:  # the loop is going away: so are its callers
                    for entry in batch:
                        entry.future.cancel()
                    raise
                except Exception as exc:  # every waiting caller learns of the failure
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(exc)
                    continue
                start = 0
                for entry in batch:
                    end = start + len(entry.items)
                    if not entry.future.done():
                        entry.future.set_result(list(results[start:end]))
                    start = end
        finally:
            self._drainer = None
            if self._pending and not self._closed:  # arrivals after the last take
                self._start_drain()

    def _call(self, items: list[T]) -> list[R]:
        with self._lock:
            self.calls += 1
            self.items_processed += len(items)
            self.batch_sizes.append(len(items))
        return self._fn(items)

    def close(self) -> None:
        """Stop the worker thread (after the batch it is running, if any)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=False, cancel_futures=True)


class BatchingGuard(Guard):
    """A `Guard` whose `check()` calls are micro-batched into calls of `batch_fn`.

    `batch_fn(items) -> verdicts` is synchronous (it runs in the batcher's worker thread) and
    returns one verdict per input, in order. Each verdict's `latency_s` is set to what its caller
    waited: queueing plus the batched call.
    """

    def __init__(
        self,
        name: str,
        stages: frozenset[Stage],
        batch_fn: Callable[[list[GuardInput]], list[GuardVerdict]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
    ) -> None:
        self.name = name
        self.stages = frozenset(stages)
        self.batcher: MicroBatcher[GuardInput, GuardVerdict] = MicroBatcher(
            batch_fn, max_batch=max_batch, max_wait_s=max_wait_s, name=name
        )

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        started = time.perf_counter()
        verdicts = await self.batcher.submit(items)
        elapsed = time.perf_counter() - started
        for verdict in verdicts:
            verdict.latency_s = elapsed
        return verdicts

    def close(self) -> None:
        self.batcher.close()
