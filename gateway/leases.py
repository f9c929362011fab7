"""The concurrency leases one process holds, renewed together by one heartbeat.

A request admitted under a concurrency limit holds a lease in Redis that expires
`GATEWAY_CONCURRENCY_LEASE_TTL_S` (10 s) after admission unless renewed. Instead of a task per
request, the rate limiter registers each lease here at admission and drops it when the request
is settled; one heartbeat task renews all of them every third of the lease time, one script
call per API key, all sent in the same socket write (the limiter's pipelined connection), so
a process pays one Redis round trip per beat whatever it serves. A replica that dies stops
renewing, and its slots free within one lease time.

A lease is renewed while its request lives: the keeper holds only a weak reference to the
request's admission, so an admission dropped without being settled (a bug) stops being
renewed and frees like a dead replica's, instead of holding its slot for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

# renew(api key id, request ids) -> how many of those leases Redis had lost (re-established)
Renew = Callable[[str, list[str]], Awaitable[int]]


class LeaseKeeper:
    """Request id -> (API key id, the admission), renewed every `interval_s` while any."""

    def __init__(self, renew: Renew, interval_s: float) -> None:
        self._renew = renew
        self.interval_s = interval_s
        self._leases: dict[str, tuple[str, weakref.ref[object]]] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._leases)

    def hold(self, key_id: str, request_id: str, admission: object) -> None:
        self._leases[request_id] = (key_id, weakref.ref(admission))
        if self._task is None or self._task.done():
            # Runs only while there are leases: an idle process has no task to wake.
            self._task = asyncio.get_running_loop().create_task(self._run())

    def drop(self, request_id: str) -> None:
        self._leases.pop(request_id, None)

    async def _run(self) -> None:
        while self._leases:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> None:
        """Renew every live lease now (one call per API key, all in one round trip)."""
        by_key: dict[str, list[str]] = {}
        for request_id, (key_id, admission) in list(self._leases.items()):
            if admission() is None:  # dropped without settle: let its lease run out
                del self._leases[request_id]
                continue
            by_key.setdefault(key_id, []).append(request_id)
        if not by_key:
            return
        # The renew tasks are created in this step, so they run (and write their calls) before
        # the task of any settle that follows (settle drops its lease synchronously first):
        # on the one FIFO connection, a renewal never lands after the release it raced with
        # and resurrects a finished request's slot.
        results = await asyncio.gather(
            *(self._renew(key_id, ids) for key_id, ids in by_key.items()),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        lost = sum(r for r in results if isinstance(r, int))
        if errors:
            log.warning(
                "lease renewal failed",
                api_keys=len(errors),
                leases=len(self._leases),
                error=type(errors[0]).__name__,
            )
        if lost:
            # Redis lost them (a flush, an empty replica) or a stall outlived them: they are
            # back, and the concurrency count is true again.
            log.warning("concurrency leases re-established", leases=lost)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        self._leases.clear()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
