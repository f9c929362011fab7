"""Concurrency leases against the real Redis: a dead holder's slot frees after the lease time,
a live one is kept by the process's heartbeat, and Retry-After is the real remaining wait."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from gateway.errors import RateLimited
from gateway.ratelimit import RateLimiter
from gateway.redis_conn import key_name, make_client
from tests.gateway.conftest import make_key, requires_redis
from tests.gateway.processes import REDIS_SERVER, Server
from tests.gateway.test_redis_outage import CountingProxy

pytestmark = requires_redis


def limiter(client: aioredis.Redis, prefix: str, lease_ms: int) -> RateLimiter:
    return RateLimiter(client, prefix=prefix, lease_ms=lease_ms, deadline_s=5.0)


async def lease_left_ms(client: aioredis.Redis, prefix: str, key_id: str) -> float:
    """The real wait: until the oldest lease expires, by the Redis server's clock."""
    oldest = await client.zrange(key_name(prefix, key_id, "cc"), 0, 0, withscores=True)
    seconds, micros = await client.time()
    return float(oldest[0][1]) - (seconds * 1000 + micros / 1000)


async def test_dead_holders_slot_frees_at_the_retry_after_it_was_given(
    client: aioredis.Redis, prefix: str
) -> None:
    dead = limiter(client, prefix, lease_ms=1500)
    alive = limiter(client, prefix, lease_ms=1500)
    key = make_key(max_concurrency=1)
    held = await dead.admit(key, 1, 1)
    await dead.aclose()  # the replica dies holding the slot: no heartbeat, no settle
    await asyncio.sleep(0.3)
    with pytest.raises(RateLimited) as refused:
        await alive.admit(key, 1, 1)
    asked_at = time.monotonic()
    real_ms = await lease_left_ms(client, prefix, key.id)
    headers = refused.value.headers
    hint_ms = int(headers["retry-after-ms"])
    # The hint is the real remaining wait (1.2 s here, not the old flat "1" nor the lease)...
    assert 900 < real_ms < 1300 and abs(hint_ms - real_ms) < 100, (hint_ms, real_ms)
    # ...and Retry-After is it rounded up: within 1 s of the real wait, never less.
    assert int(headers["Retry-After"]) == math.ceil(hint_ms / 1000) == 2
    assert real_ms <= int(headers["Retry-After"]) * 1000 < real_ms + 1000
    # Never shorter than the real wait: just before it, the slot is still taken.
    await asyncio.sleep(max(0.0, hint_ms / 1000 - 0.25 - (time.monotonic() - asked_at)))
    early = await alive.admit(key, 1, 1, raise_on_reject=False)
    assert not early.admitted and 0 < early.retry_after <= 0.35
    # At the hint, it is free: the dead replica's lease ran out.
    await asyncio.sleep(max(0.0, hint_ms / 1000 + 0.05 - (time.monotonic() - asked_at)))
    ok = await alive.admit(key, 1, 1)
    assert ok.admitted and held.request_id != ok.request_id
    await alive.settle(ok, 0)
    await alive.aclose()


async def test_live_request_keeps_its_lease_past_the_timeout(
    client: aioredis.Redis, prefix: str
) -> None:
    holder = limiter(client, prefix, lease_ms=900)  # renewed every 300 ms
    other = limiter(client, prefix, lease_ms=900)  # another replica
    key = make_key(max_concurrency=1)
    held = await holder.admit(key, 1, 1)
    assert len(holder.leases) == 1
    deadline = time.monotonic() + 3.0  # more than three lease times
    while time.monotonic() < deadline:
        refused = await other.admit(key, 1, 1, raise_on_reject=False)
        assert not refused.admitted and refused.limit == "concurrency"
        # Renewed: always between 2/3 of a lease (just before a beat) and a whole one ahead.
        assert 0 < await lease_left_ms(client, prefix, key.id) <= 900
        await asyncio.sleep(0.1)
    await holder.settle(held, 0)  # the request ends: the slot frees at once, renewals stop
    assert len(holder.leases) == 0
    ok = await other.admit(key, 1, 1)
    assert ok.admitted
    await other.settle(ok, 0)
    task = holder.leases._task
    assert task is not None
    await asyncio.wait_for(task, 2)  # no idle task: it ends at its next wake-up
    await holder.aclose()
    await other.aclose()


async def test_leases_lost_by_redis_are_put_back(client: aioredis.Redis, prefix: str) -> None:
    """After Redis lost its data (here: this test's keys deleted), the next beat puts the
    live requests' leases back, so the concurrency count is true again."""
    holder = limiter(client, prefix, lease_ms=600)
    key = make_key(max_concurrency=2)
    running = [await holder.admit(key, 1, 1) for _ in range(2)]
    async for name in client.scan_iter(match=f"{prefix}:*"):
        await client.delete(name)
    cc = key_name(prefix, key.id, "cc")
    assert await client.zcard(cc) == 0
    newcomer = await holder.admit(key, 1, 1)  # the lost leases let one more in meanwhile
    await asyncio.sleep(0.35)  # one beat
    assert await client.zcard(cc) == 3  # every running request counted again
    refused = await holder.admit(key, 1, 1, raise_on_reject=False)
    assert not refused.admitted and refused.limit == "concurrency"
    for adm in [*running, newcomer]:
        await holder.settle(adm, 0)
    assert await client.zcard(cc) == 0
    await holder.aclose()


@pytest.fixture
def private_redis() -> Iterator[Server]:
    if not REDIS_SERVER:
        pytest.skip("needs redis-server")
    s = Server()
    s.start()
    yield s
    s.kill()


async def test_one_beat_is_one_round_trip_for_all_leases(private_redis: Server) -> None:
    probe = redis.Redis(port=private_redis.port, decode_responses=True)

    def evalsha_calls() -> int:
        return int(probe.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    proxy = CountingProxy(private_redis.port)
    async with proxy as url:
        client = make_client(url)
        rl = RateLimiter(client, lease_ms=60_000)  # the timer's beat (20 s) stays out of it
        keys = [make_key(max_concurrency=10) for _ in range(3)]
        running = [await rl.admit(k, 1, 1) for k in keys for _ in range(4)]  # 12 leases
        await rl.leases.beat()  # loads the script (NOSCRIPT, SCRIPT LOAD)
        writes, calls = proxy.chunks, evalsha_calls()
        for _ in range(3):
            await rl.leases.beat()
        # Per beat: one socket write, carrying one script call per API key.
        assert (proxy.chunks - writes, evalsha_calls() - calls) == (3, 9)
        for adm in running:
            await rl.settle(adm, 0)
        assert len(rl.leases) == 0 and probe.keys("*:cc") == []
        await rl.aclose()
        await client.aclose()
    probe.close()


async def test_heartbeat_survives_an_outage_and_refills_an_empty_redis(
    private_redis: Server,
) -> None:
    client = make_client(private_redis.url)
    rl = RateLimiter(client, lease_ms=900)  # a beat every 300 ms
    key = make_key(max_concurrency=1)
    running = await rl.admit(key, 1, 1)
    private_redis.kill()
    await asyncio.sleep(0.7)  # beats fail (logged, counted); the keeper keeps going
    assert rl.leases._task is not None and not rl.leases._task.done()
    private_redis.start()  # back, empty: no lease, no script
    probe = redis.Redis(port=private_redis.port)
    cc = key_name("gw", key.id, "cc")
    deadline = time.monotonic() + 3
    while not probe.zcard(cc):
        assert time.monotonic() < deadline, "the running request's lease never came back"
        await asyncio.sleep(0.05)
    refused = await rl.admit(key, 1, 1, raise_on_reject=False)
    assert not refused.admitted and refused.limit == "concurrency"
    await rl.settle(running, 0)
    assert (await rl.admit(key, 1, 1)).admitted
    probe.close()
    await rl.aclose()
    await client.aclose()
