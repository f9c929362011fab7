"""Admission control against the real Redis at 127.0.0.1:6379 (random key prefix per test)."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import secrets
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.keys import ApiKey
from gateway.ratelimit import RateLimiter, format_duration
from gateway.redis_conn import RedisMetrics, key_name, make_client
from tests.gateway.conftest import REDIS_URL, make_key, requires_redis

pytestmark = requires_redis


def limiter(client: aioredis.Redis, prefix: str, **kw: object) -> RateLimiter:
    kw.setdefault("deadline_s", 5.0)  # tests measure limits, not latency
    return RateLimiter(client, prefix=prefix, **kw)  # type: ignore[arg-type]


# -- exactness across processes ------------------------------------------------------------


def _worker(prefix: str, key: ApiKey, n: int, barrier: object, out: object) -> None:
    async def run() -> int:
        c = make_client(REDIS_URL, connect_timeout_s=2, socket_timeout_s=5, max_connections=n)
        rl = limiter(c, prefix)
        await asyncio.gather(*(c.ping() for _ in range(n)))  # open the pool before the race
        barrier.wait()  # type: ignore[attr-defined]
        results = []
        for _ in range(n // 20):  # waves of 20 concurrent calls, so both processes interleave
            wave = (rl.admit(key, 1, 1, raise_on_reject=False) for _ in range(20))
            results += await asyncio.gather(*wave)
            await asyncio.sleep(0.001)
        await c.aclose()
        return sum(a.admitted for a in results)

    out.put(asyncio.run(run()))  # type: ignore[attr-defined]


def test_exactly_rpm_admitted_across_two_processes(prefix: str) -> None:
    key = make_key(rpm=50)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(prefix, key, 100, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(counts) == 50, counts


# -- sliding window ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sliding_window_not_fixed(client: aioredis.Redis, prefix: str) -> None:
    window = 1000
    rl = limiter(client, prefix, window_ms=window)
    key = make_key(rpm=5)
    t0 = time.monotonic()
    first = [await rl.admit(key, 1, 1, raise_on_reject=False) for _ in range(6)]
    assert [a.admitted for a in first] == [True] * 5 + [False]
    # Every fixed 1 s window has a boundary somewhere in the next second; a fixed-window
    # limiter would admit again right after it. The sliding window refuses until t0 + 1 s.
    while time.monotonic() - t0 < 0.9:
        a = await rl.admit(key, 1, 1, raise_on_reject=False)
        assert not a.admitted and a.limit == "requests"
        assert 0 < a.retry_after <= 1.0
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, t0 + 1.05 - time.monotonic()))
    again = [await rl.admit(key, 1, 1, raise_on_reject=False) for _ in range(6)]
    assert [a.admitted for a in again] == [True] * 5 + [False]


@pytest.mark.asyncio
async def test_no_window_ever_exceeds_limit(client: aioredis.Redis, prefix: str) -> None:
    window_s, rpm = 0.5, 4
    rl = limiter(client, prefix, window_ms=int(window_s * 1000))
    key = make_key(rpm=rpm)
    admitted: list[float] = []
    end = time.monotonic() + 1.6
    while time.monotonic() < end:
        sent = time.monotonic()
        burst = secrets.randbelow(3) + 1
        results = await asyncio.gather(
            *(rl.admit(key, 1, 1, raise_on_reject=False) for _ in range(burst))
        )
        mid = (sent + time.monotonic()) / 2
        admitted += [mid for a in results if a.admitted]
        await asyncio.sleep(secrets.randbelow(60) / 1000)
    # Local times approximate the server's within a few ms: check a slightly shorter window.
    for t in admitted:
        assert sum(1 for u in admitted if t - (window_s - 0.02) < u <= t) <= rpm
    assert len(admitted) >= 2 * rpm  # the window slid; it did not just block everything


# -- tokens --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tokens_reserved_and_settled(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix, window_ms=5000)
    key = make_key(tpm=100)
    started = time.monotonic()
    with pytest.raises(RateLimited) as never:
        await rl.admit(key, 60, 50)  # 110 > 100: can never fit
    assert time.monotonic() - started < 0.1
    assert never.value.error_type == "tokens" and never.value.status_code == 429
    assert never.value.headers["x-should-retry"] == "false"

    a = await rl.admit(key, 50, 40)
    assert a.admitted and a.remaining_tokens == 10
    with pytest.raises(RateLimited) as short:
        await rl.admit(key, 5, 10)
    assert short.value.error_type == "tokens"
    assert short.value.headers["x-ratelimit-remaining-tokens"] == "10"
    assert 1 <= int(short.value.headers["Retry-After"]) <= 5

    await rl.settle(a, 45)  # 45 of 90 used: 45 come back
    b = await rl.admit(key, 5, 10)
    assert b.admitted and b.remaining_tokens == 100 - 45 - 15
    await rl.settle(b, 15)
    await rl.settle(b, 0)  # settling twice changes nothing
    c = await rl.admit(key, 0, 40)
    assert c.remaining_tokens == 100 - 45 - 15 - 40


@pytest.mark.asyncio
async def test_token_sum_rebuilt_when_lost(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix, window_ms=5000)
    key = make_key(tpm=100)
    a = await rl.admit(key, 10, 20)
    await client.delete(key_name(prefix, key.id, "tks"))  # as if it expired a tick early
    await rl.settle(a, 25)
    assert await client.get(key_name(prefix, key.id, "tks")) == "25"
    await client.delete(key_name(prefix, key.id, "tks"))
    b = await rl.admit(key, 5, 5)
    assert b.remaining_tokens == 100 - 25 - 10


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrency_slot(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix)
    key = make_key(max_concurrency=1)
    a = await rl.admit(key, 1, 1)
    with pytest.raises(RateLimited) as exc:
        await rl.admit(key, 1, 1)
    assert exc.value.error_type == "concurrency" and exc.value.code == "rate_limit_exceeded"
    # The slot frees for sure when its lease (10 s, just taken) runs out: not "1".
    assert exc.value.headers["Retry-After"] == "10"
    assert 9_000 < int(exc.value.headers["retry-after-ms"]) <= 10_000
    await rl.settle(a, 2)
    b = await rl.admit(key, 1, 1)
    assert b.admitted


@pytest.mark.asyncio
async def test_dropped_admission_is_not_renewed(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix, lease_ms=300)
    key = make_key(max_concurrency=1)
    await rl.admit(key, 1, 1)  # dropped, never settled (a bug): its lease is not kept alive
    assert not (await rl.admit(key, 1, 1, raise_on_reject=False)).admitted
    await asyncio.sleep(0.35)
    assert (await rl.admit(key, 1, 1, raise_on_reject=False)).admitted
    await rl.aclose()


@pytest.mark.asyncio
async def test_renew_extends_or_puts_back(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix, lease_ms=400)
    other = limiter(client, prefix, lease_ms=400)  # another replica, renewing nothing
    key = make_key(max_concurrency=1)
    a = await rl.admit(key, 1, 1)
    rl.leases.drop(a.request_id)  # only explicit renewals in this test
    await asyncio.sleep(0.25)
    assert await rl.renew(a)
    await asyncio.sleep(0.25)  # past the first lease, inside the renewed one
    assert not (await other.admit(key, 1, 1, raise_on_reject=False)).admitted
    await asyncio.sleep(0.45)  # expired, and the slot taken by someone else
    b = await other.admit(key, 1, 1)
    assert not await rl.renew(a)  # it had expired: False, and it is back (the request runs)
    assert await client.zcard(key_name(prefix, key.id, "cc")) == 2  # the true count
    await rl.settle(a, 0)
    await other.settle(b, 0)
    assert await client.zcard(key_name(prefix, key.id, "cc")) == 0
    await rl.aclose()
    await other.aclose()


# -- results and headers -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_retry_after_and_headers(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix)  # the real 60 s window
    key = make_key(rpm=2)
    a = await rl.admit(key, 1, 1)
    h = a.headers()
    assert h["x-ratelimit-limit-requests"] == "2"
    assert h["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"(59\.\d{1,3}s|1m0s)", h["x-ratelimit-reset-requests"]), h
    assert "x-ratelimit-limit-tokens" not in h  # unlimited: omitted
    assert "Retry-After" not in h
    await rl.admit(key, 1, 1)
    with pytest.raises(RateLimited) as exc:
        await rl.admit(key, 1, 1)
    headers = exc.value.headers
    assert exc.value.error_type == "requests"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 59 <= int(headers["Retry-After"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert "Please try again in" in exc.value.message


@pytest.mark.asyncio
async def test_lowered_limit_counts_existing_window(client: aioredis.Redis, prefix: str) -> None:
    rl = limiter(client, prefix, window_ms=2000)
    key = make_key(rpm=3)
    for _ in range(3):
        await rl.admit(key, 1, 1)
    lowered = replace(key, rpm=1)  # a PATCH lowered the limit
    refused = await rl.admit(lowered, 1, 1, raise_on_reject=False)
    assert not refused.admitted and 0 < refused.retry_after <= 2.0


def test_format_duration() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(120) == "120ms"
    assert format_duration(999.2) == "1s"
    assert format_duration(1000) == "1s"
    assert format_duration(1500) == "1.5s"
    assert format_duration(6 * 60_000) == "6m0s"
    assert format_duration(61_250) == "1m1.25s"
    assert format_duration(3_661_000) == "1h1m1s"


@pytest.mark.asyncio
async def test_unlimited_key_needs_no_redis() -> None:
    dead = make_client("redis://127.0.0.1:1", connect_timeout_s=0.05)  # nothing listens
    rl = RateLimiter(dead)
    a = await rl.admit(make_key(), 100, 100)
    assert a.admitted and a.headers() == {}
    await rl.settle(a, 10)
    await dead.aclose()


@pytest.mark.asyncio
async def test_metrics(client: aioredis.Redis, prefix: str) -> None:
    registry = CollectorRegistry()
    rl = limiter(client, prefix, metrics=RedisMetrics(registry))
    key = make_key(rpm=1)
    await rl.admit(key, 1, 1)
    await rl.admit(key, 1, 1, raise_on_reject=False)
    assert registry.get_sample_value("gateway_ratelimit_admissions_total") == 1
    rejected = registry.get_sample_value(
        "gateway_ratelimit_rejections_total", {"limit": "requests"}
    )
    assert rejected == 1
    assert registry.get_sample_value("gateway_ratelimit_admission_seconds_count") == 2
    # Key names carry the key id as the Redis Cluster hash tag.
    assert await client.exists(key_name(prefix, key.id, "rq"))
    assert key_name("gw", "key_1", "rq") == "gw:{key_1}:rq"


async def test_an_admission_answered_too_late_leaks_nothing(prefix: str) -> None:
    """Redis runs the admission but its reply misses the deadline: the client gets 503, and
    the recorded slot and reservation are undone in the background."""
    delay = 0.0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
        try:
            while data := await reader.read(65536):
                if slow and delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", 6379)
        await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    slow = make_client(f"redis://127.0.0.1:{port}/0", socket_timeout_s=5, connect_timeout_s=5)
    direct = make_client(REDIS_URL)
    limiter = RateLimiter(slow, prefix=prefix, deadline_s=0.2)
    key = make_key(max_concurrency=1, tpm=1000)
    try:
        await limiter.admit(make_key(rpm=100), 1, 1)  # warm: connection and script loaded
        delay = 0.3
        with pytest.raises(ServiceUnavailable):
            await limiter.admit(key, 100, 100)
        await asyncio.sleep(1.5)  # the late reply, then the undo through the same slow path
        assert await direct.zcard(f"{prefix}:{{{key.id}}}:cc") == 0
        assert int(await direct.get(f"{prefix}:{{{key.id}}}:tks") or 0) == 0
    finally:
        proxy.close()
        await slow.aclose()
        await direct.aclose()
