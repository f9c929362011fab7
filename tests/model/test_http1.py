"""`model.http1` against real sockets on 127.0.0.1: its TLS path (a certificate authority and a
server certificate made here with the `openssl` CLI) and its back-pressure on a slow reader."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from model.errors import ConnectionFailed
from model.http1 import BODY_HIGH_WATER, ConnectionPool, Response

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: upstream\r\ncontent-type: application/json"
BIG = 64 * 1024 * 1024  # far more than loopback's socket buffers hold
PIECE = 64 * 1024
# One socket read: asyncio's selector transport and its TLS layer read at most 256 KiB at once.
ONE_READ = 256 * 1024


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the authority a client trusts
    chain: Path  # the server's certificate, issued by `ca` for 127.0.0.1 only
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.chain, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI makes the test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=http1 test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=d)  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    return Certificates(ca=d / "ca.pem", chain=d / "server.pem", key=d / "server.key")


@dataclass
class Upstream:
    """A raw HTTP/1.1 server: every request gets `body` (or `size` bytes when `size` is set),
    sent in pieces, each handed to the socket only when the previous ones drained."""

    port: int = 0
    body: bytes = b'{"ok": true}'
    size: int = 0
    sent: int = 0  # body bytes handed to the transport so far
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(await reader.readexactly(length))
                size = self.size or len(self.body)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                if not self.size:
                    writer.write(self.body)
                    self.sent += len(self.body)
                    await writer.drain()
                    continue
                piece = bytes(range(256)) * (PIECE // 256)
                for _ in range(size // PIECE):
                    writer.write(piece)
                    self.sent += PIECE
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[[Upstream, ssl.SSLContext | None], Awaitable[Upstream]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(upstream: Upstream, tls: ssl.SSLContext | None) -> Upstream:
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        upstream.port = server.sockets[0].getsockname()[1]
        return upstream

    yield start
    for server in servers:
        server.close()


def pool_for(url: str, ssl_context: ssl.SSLContext | None = None) -> ConnectionPool:
    return ConnectionPool(
        url,
        size=4,
        connect_timeout=5.0,
        pool_timeout=5.0,
        read_timeout=10.0,
        ssl_context=ssl_context,
    )


def deadline(seconds: float = 20.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def read_all(resp: Response) -> bytes:
    parts = []
    while chunk := await resp.read(deadline()):
        parts.append(chunk)
    return b"".join(parts)


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_upstream_trusted_through_the_context(serve: Serve, certs: Certificates) -> None:
    upstream = await serve(Upstream(), certs.server_context())
    pool = pool_for(f"https://127.0.0.1:{upstream.port}", ssl_context=certs.client_context())
    try:
        for n in range(3):  # keep-alive over TLS: one handshake, three answers
            resp = await pool.request(HEAD, b'{"n": %d}' % n, deadline())
            assert resp.status == 200
            assert await read_all(resp) == upstream.body
            resp.release()
    finally:
        await pool.close()
    assert upstream.requests == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert upstream.connections == 1


async def test_tls_default_context_honours_ssl_cert_file(
    serve: Serve, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How a deployment trusts a private CA for an https `api_base`: the upstream engine uses
    the default context, which reads SSL_CERT_FILE."""
    upstream = await serve(Upstream(), certs.server_context())
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    pool = pool_for(f"https://127.0.0.1:{upstream.port}")
    try:
        resp = await pool.request(HEAD, b"{}", deadline())
        assert resp.status == 200 and await read_all(resp) == upstream.body
        resp.release()
    finally:
        await pool.close()


async def test_tls_untrusted_certificate_fails_clearly(serve: Serve, certs: Certificates) -> None:
    upstream = await serve(Upstream(), certs.server_context())
    pool = pool_for(f"https://127.0.0.1:{upstream.port}", ssl_context=ssl.create_default_context())
    try:
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await pool.request(HEAD, b"{}", deadline())
    finally:
        await pool.close()
    assert upstream.requests == []  # nothing was sent to a server that was not verified


async def test_tls_checks_the_host_name(serve: Serve, certs: Certificates) -> None:
    """The certificate is for 127.0.0.1 only: the same server reached as `localhost` is refused."""
    upstream = await serve(Upstream(), certs.server_context())
    pool = pool_for(f"https://localhost:{upstream.port}", ssl_context=certs.client_context())
    try:
        with pytest.raises(ConnectionFailed, match="Hostname mismatch"):
            await pool.request(HEAD, b"{}", deadline())
    finally:
        await pool.close()
    assert upstream.requests == []


# -- back-pressure ---------------------------------------------------------------------------


async def wait_until_stalled(upstream: Upstream, quiet_s: float = 0.3) -> int:
    """Until the server has handed nothing more to its socket for `quiet_s` (it is blocked)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30
    last, since = upstream.sent, loop.time()
    while loop.time() - since < quiet_s:
        assert loop.time() < give_up, "the server never stopped sending"
        await asyncio.sleep(0.05)
        if upstream.sent != last:
            last, since = upstream.sent, loop.time()
    return last


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_a_slow_reader_pushes_back_on_the_server(
    serve, certs: Certificates, tls: bool
) -> None:
    """The promise: while the reader does not read, the client holds at most BODY_HIGH_WATER
    plus one socket read and stops reading, so TCP stops the server; every byte still arrives
    once the reader catches up, and the connection is kept for the next request."""
    upstream = await serve(Upstream(size=BIG), certs.server_context() if tls else None)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{upstream.port}"
    pool = pool_for(url, certs.client_context() if tls else None)
    try:
        resp = await pool.request(HEAD, b"{}", deadline())
        stalled_at = await wait_until_stalled(upstream)
        assert stalled_at < BIG // 2, (
            f"the server sent {stalled_at} bytes to a reader that read none"
        )
        assert BODY_HIGH_WATER < resp.buffered <= BODY_HIGH_WATER + ONE_READ

        # Catching up: reading resumes the socket, and the server gets going again.
        received = 0
        piece = bytes(range(256)) * (PIECE // 256)
        tail = b""
        while chunk := await resp.read(deadline(60)):
            assert resp.buffered <= BODY_HIGH_WATER + ONE_READ
            data = tail + chunk
            whole = len(data) - len(data) % PIECE
            assert data[:whole] == piece * (whole // PIECE)
            tail = data[whole:]
            received += len(chunk)
        assert received == BIG and tail == b"" and upstream.sent == BIG
        resp.release()

        upstream.size = 0  # a small answer on the same connection
        resp = await pool.request(HEAD, b"{}", deadline())
        assert await read_all(resp) == upstream.body
        resp.release()
    finally:
        await pool.close()
    assert upstream.connections == 1
