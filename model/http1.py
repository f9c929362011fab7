"""A small pooled HTTP/1.1 client for the upstream engine's one call: POST, then read the body.

Why not aiohttp: its streamed call was a large part of a guards-off gateway request's CPU; this
client (an asyncio protocol + httptools, the parser uvicorn uses) does the same call for less
(bench/gateway_overhead/client_micro.py; figures in bench/NOTES.md). It does only what the
upstream engine needs: keep-alive connections pooled per origin, http and https (trusting the
system's store, or the `ssl_context` given), a connect timeout, chunked and length-delimited
bodies decoded as they arrive, a reader that does not read holding back the socket (at most
`BODY_HIGH_WATER` bytes buffered), and a connection that is closed (never reused) unless its
response was read to its end.

Errors are `model.errors.HTTPError` subclasses: `ConnectTimeout` (nothing was sent),
`ReadTimeout`, and `ConnectionFailed` (refused, reset, closed early, or not HTTP).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools

from model.errors import ConnectionFailed, ConnectTimeout, ReadTimeout

# Body bytes held for a reader before the connection stops reading from the socket (the
# promise to a slow reader: at most this plus one socket read is held in memory).
BODY_HIGH_WATER = 256 * 1024


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill the current response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: BaseException | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = ""
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.framed = False  # a content-length or chunked body; else it ends when the server closes
        self.body: deque[bytes] = deque()
        self.buffered = 0

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = ConnectionFailed(f"invalid HTTP from the server: {exc}")
            self.close()
        if self.buffered > BODY_HIGH_WATER and self.transport is not None:
            # A slow reader (its client is slow): let TCP push back on the server.
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.framed and exc is None:
            self.complete = True  # the body of an unframed answer ends with the connection
        if self.error is None and not self.complete:
            reason = f": {type(exc).__name__}: {exc}" if exc else ""
            self.error = ConnectionFailed(f"the server closed the connection{reason}")
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Asked here: once the message is complete, httptools answers for the next one.
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- used by the client --------------------------------------------------------------
    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_at: float, deadline: float) -> None:
        """Until the parser made progress (or the connection failed)."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        # A timer on the waiter, not an `asyncio.timeout` scope: once or more per upstream
        # answer, and the scope costs a task lookup and two timer reschedules each time.
        timer = loop.call_at(min(timeout_at, deadline), _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            if loop.time() >= deadline:
                raise  # the caller's total deadline: a plain TimeoutError
            raise ReadTimeout("no data within the read timeout") from None
        finally:
            timer.cancel()
            self._waiter = None

    def reusable(self) -> bool:
        return self.complete and not self.closed and self.keep_alive

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """The answer to one request; read the body with `read()` until it returns b""."""

    def __init__(self, pool: ConnectionPool, conn: _Connection, read_timeout: float) -> None:
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._released = False
        self.status = conn.status
        self.content_type = conn.content_type

    async def read(self, deadline: float) -> bytes:
        """What arrived of the body (waiting for more when nothing did); b"" at its end."""
        conn = self._conn
        while not conn.body:
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            loop = asyncio.get_running_loop()
            await conn.wait(loop.time() + self._read_timeout, deadline)
        if len(conn.body) == 1:
            data = conn.body.popleft()
        else:
            data = b"".join(conn.body)
            conn.body.clear()
        if conn.buffered > BODY_HIGH_WATER and conn.transport is not None:
            conn.transport.resume_reading()
        conn.buffered = 0
        return data

    @property
    def buffered(self) -> int:
        """Body bytes received and not read yet."""
        return self._conn.buffered

    @property
    def ended(self) -> bool:
        return self._conn.complete and not self._conn.body

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed (which is also how
        the server learns that the client left). Idempotent."""
        if self._released:
            return
        self._released = True
        self._pool.put_back(self._conn, reuse=self.ended and self._conn.reusable())


class ConnectionPool:
    """Keep-alive connections to one origin, at most `size` at a time (in use or idle)."""

    def __init__(
        self,
        base_url: str,
        *,
        size: int,
        connect_timeout: float,
        pool_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: for an https origin (default: the system's trust store, which
        `SSL_CERT_FILE` / `SSL_CERT_DIR` replace, e.g. with a private CA)."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Connection] = []
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._read_timeout = read_timeout
        self._open: set[_Connection] = set()

    async def request(
        self, head: bytes, body: bytes, deadline: float, read_timeout: float | None = None
    ) -> Response:
        """Send one request (`head`: request line and headers, without the blank line) and
        wait for the answer's status and headers. `read_timeout`: the longest silence for this
        request (default: the pool's)."""
        if read_timeout is None:
            read_timeout = self._read_timeout
        conn = await self._acquire(deadline)
        try:
            conn._reset()
            assert conn.transport is not None
            conn.transport.write(b"%s\r\ncontent-length: %d\r\n\r\n%s" % (head, len(body), body))
            loop = asyncio.get_running_loop()
            timeout_at = loop.time() + read_timeout
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(timeout_at, deadline)
        except BaseException:
            self.put_back(conn, reuse=False)
            raise
        return Response(self, conn, read_timeout)

    async def _acquire(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self._slots.locked():  # a free slot needs no timeout scope (the usual case)
                async with asyncio.timeout_at(min(deadline, loop.time() + self._pool_timeout)):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            if loop.time() >= deadline:
                raise
            raise ConnectTimeout("no free pooled connection within the pool timeout") from None
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._open.discard(conn)
            return await self._connect(deadline)
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            if loop.time() >= deadline:
                raise
            raise ConnectTimeout(f"no connection within {self._connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        self._open.add(conn)
        return conn

    def put_back(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse:
            self._idle.append(conn)
        else:
            conn.close()
            self._open.discard(conn)
        self._slots.release()

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close
