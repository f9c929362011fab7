"""The gateway's HTTP protocol (uvicorn's httptools one, writes coalesced) on a real server."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from typing import Any

from gateway.http_server import CoalescingHttpToolsProtocol
from tests.conftest import LiveServer

BODY = b'{"answer": "' + b"x" * 2000 + b'"}'


class _CountingTransport:
    """Below the coalescing transport: counts what reaches the real socket."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def counting_protocol(writes: list[bytes]) -> type[CoalescingHttpToolsProtocol]:
    class Counting(CoalescingHttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(_CountingTransport(transport, writes))  # type: ignore[arg-type]

    return Counting


async def json_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def test_head_and_body_leave_in_one_write() -> None:
    writes: list[bytes] = []
    with LiveServer(json_app, http=counting_protocol(writes)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for _ in range(3):  # keep-alive: every response on the connection
            conn.request("POST", "/", b"{}", {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == BODY
        conn.close()
    responses = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    assert len(responses) == 3
    assert all(w.endswith(BODY) for w in responses)  # the head with its body, one write each
    assert len(writes) == 3


def test_a_held_write_leaves_without_a_next_one() -> None:
    """A stream's chunk is held at most until the end of the loop iteration: the app sends
    the next chunk only after the client got the previous one (else this would hang)."""
    got_first = threading.Event()

    async def stream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        for _ in range(500):  # wait for the client to have read the first chunk
            if got_first.is_set():
                break
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"data: 2\n\n"})

    with (
        LiveServer(stream_app) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"data: 1" not in received:
            chunk = sock.recv(65536)
            assert chunk, "closed before the first chunk"
            received += chunk
        assert b"data: 2" not in received
        got_first.set()
        while not received.endswith(b"0\r\n\r\n"):  # the chunked terminator
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    assert received.index(b"data: 1") < received.index(b"data: 2")


def test_written_before_close_is_not_lost() -> None:
    """`Connection: close`: uvicorn closes the transport right after the body; the held head
    and the body still leave first."""
    with (
        LiveServer(json_app) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(BODY)
