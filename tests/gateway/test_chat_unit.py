"""Small pieces of the chat service."""

from __future__ import annotations

import asyncio

import pytest

from gateway.chat import _all_or_nothing


async def test_when_one_choice_fails_the_others_are_cancelled() -> None:
    still_running = asyncio.Event()
    cancelled = asyncio.Event()

    async def fails() -> int:
        await still_running.wait()
        raise RuntimeError("engine error")

    async def hangs() -> int:
        still_running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    with pytest.raises(RuntimeError):
        await _all_or_nothing([hangs(), fails()])
    assert cancelled.is_set()


async def test_all_results_in_order() -> None:
    async def value(v: int) -> int:
        await asyncio.sleep(0.001 * (3 - v))
        return v

    assert await _all_or_nothing([value(1), value(2), value(3)]) == [1, 2, 3]
