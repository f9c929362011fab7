"""EVALSHA of the rate-limit scripts on one pipelined connection of the limiter's own.

Every request makes two Redis calls (admit, settle), so their client cost is a large part of
a guards-off request: with redis-py's `Connection` (one call at a time per connection, asyncio
streams, one socket write per call) Redis was a large share of the gateway's CPU under load
(py-spy, bench/gateway_overhead; figures in bench/NOTES.md). Here, as in ioredis'
auto-pipelining:

- all calls share one connection: the calls made in one event-loop iteration leave in one
  socket write, and the replies are matched to them in order (FIFO), each read feeding
  hiredis' C parser;
- a call past its deadline fails with `TimeoutError` from a timer on its reply's future (no
  `asyncio.timeout` scope: that cost a task lookup and two timer reschedules per call); its
  reply is still read and dropped, the order stays intact, and the connection is kept;
- a connection that answers nothing for `STALE_S` while calls wait is aborted; the next call
  connects again. A call that fails with a connection error (a stale connection after a Redis
  restart) is retried once, on the connection that replaced it; NOSCRIPT loads the script and
  runs it again.

The connection is opened by redis-py with the client's settings (URL, AUTH, SELECT, TLS, connect
timeout), then its transport is taken over by `_Pipe`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

# Calls waiting this long with no reply at all: the connection is taken for dead.
STALE_S = 5.0


def load_lua_scripts(path: Path) -> dict[str, str]:
    """The Lua scripts in a file, by the name after each `-- @script NAME` line."""
    parts = re.split(r"^-- @script (\w+)\n", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


class _Pipe(asyncio.Protocol):
    """One Redis connection: calls written per loop iteration, replies matched in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stale_s: float = STALE_S) -> None:
        self._loop = loop
        self._stale_s = stale_s
        self._reader = hiredis.Reader(replyError=ResponseError)
        # (the time the call was made, its future, its deadline's timer), oldest first
        self._waiting: deque[tuple[float, asyncio.Future[Any], asyncio.TimerHandle | None]] = (
            deque()
        )
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.lost: RedisConnectionError | None = None
        self.stream_writer: object = None  # redis-py's, kept alive with the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if not self._waiting:
                    raise hiredis.ProtocolError("a reply to no call")
                _, waiter, timer = self._waiting.popleft()
                if timer is not None:
                    timer.cancel()
                if not waiter.done():  # done: past its deadline; the reply is dropped
                    waiter.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.close(RedisConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"Connection to Redis lost: {exc or 'closed'}")
        self._transport = None
        while self._waiting:
            _, waiter, timer = self._waiting.popleft()
            if timer is not None:
                timer.cancel()
            if not waiter.done():
                waiter.set_exception(self.lost)

    def call(self, packed: bytes, deadline: float | None = None) -> asyncio.Future[Any]:
        """Send a packed command; the future gets its reply (a ResponseError for an error), or
        `TimeoutError` at `deadline` (the loop's clock) if the reply has not come by then."""
        if self.lost is not None:
            raise self.lost
        now = time.monotonic()
        if self._waiting and now - self._waiting[0][0] > self._stale_s:
            self.close(RedisConnectionError(f"Redis answered nothing for {self._stale_s:g}s"))
            raise self.lost  # type: ignore[misc]
        waiter = self._loop.create_future()
        timer = None if deadline is None else self._loop.call_at(deadline, _expire, waiter)
        self._waiting.append((now, waiter, timer))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(packed)
        return waiter

    def _flush(self) -> None:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if self._transport is not None and self.lost is None:
            self._transport.write(data)

    def close(self, reason: RedisConnectionError) -> None:
        if self.lost is None:
            self.lost = reason
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails the waiting calls


class ScriptRunner:
    """Runs the named Lua scripts (`scripts`: name -> source) with EVALSHA."""

    def __init__(
        self, client: aioredis.Redis, scripts: dict[str, str], *, stale_s: float = STALE_S
    ) -> None:
        self._client = client
        self._stale_s = stale_s
        self._scripts = scripts
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in scripts.items()}
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Future[_Pipe] | None = None

    async def run(
        self, name: str, keys: list[str], args: list[str | int], timeout_s: float | None = None
    ) -> Any:
        """The script's reply; `TimeoutError` when it takes more than `timeout_s` in all
        (connecting and a NOSCRIPT reload included)."""
        packed = _pack("EVALSHA", self._sha[name], len(keys), *keys, *args)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        retried = loaded = False
        while True:
            try:
                pipe = self._pipe
                if pipe is None or pipe.lost is not None:
                    async with asyncio.timeout_at(deadline):
                        pipe = await self._connection()
                reply = await pipe.call(packed, deadline)
            except TimeoutError:
                raise  # an OSError too, but never retried: the script may have run
            except (RedisConnectionError, OSError):
                if retried:
                    raise
                retried = True  # once, on the connection that replaced the lost one
                continue
            if isinstance(reply, ResponseError):
                if str(reply).startswith("NOSCRIPT") and not loaded:
                    # A Redis restarted or flushed since: load, run again.
                    async with asyncio.timeout_at(deadline):
                        await self._client.script_load(self._scripts[name])
                    loaded = True
                    continue
                raise NoScriptError(str(reply)) if str(reply).startswith("NOSCRIPT") else reply
            return reply

    async def _connection(self) -> _Pipe:
        """The live connection, or a new one when it was lost. (Never a new one while it lives:
        after a Redis restart, every caller whose call failed retries, and each must not replace
        the connection that the others are already using.)"""
        pipe = self._pipe
        if pipe is not None and pipe.lost is None:
            return pipe
        if self._connecting is None:  # one connect for every caller that needs it now
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, connecting: asyncio.Future[_Pipe]) -> None:
        self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:
            self._pipe = connecting.result()  # the old one, if any, was lost

    async def _connect(self) -> _Pipe:
        pool = self._client.connection_pool
        conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        # TCP/unix/TLS, AUTH, SELECT: all that the URL asks for (redis-py leaves it untyped).
        await conn.connect()  # type: ignore[no-untyped-call]
        writer = conn._writer
        assert writer is not None
        conn._writer = conn._reader = None
        transport = cast(asyncio.Transport, writer.transport)
        pipe = _Pipe(asyncio.get_running_loop(), self._stale_s)
        # Held by the pipe: a StreamWriter closes its transport when it is collected.
        pipe.stream_writer = writer
        transport.set_protocol(pipe)
        pipe.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()
        return pipe

    async def aclose(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close(RedisConnectionError("closed"))


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no reply from Redis within the deadline"))


def _pack(*parts: str | int) -> bytes:
    """A command in RESP, as redis-py packs str and int arguments."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
