"""Admission benchmark: Redis round trips per admit/settle, and admit latency at concurrency 1/32.

    python bench/admission.py [--redis-url redis://127.0.0.1:6379/0] [--n 4000]

Round trips are counted twice: on the client (socket writes; each is one request/response
exchange) and on the server (`INFO commandstats` EVALSHA calls; shared-server traffic from
others would show up here, not in the client count). Keys use a random prefix, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio as aioredis

from gateway import redis_scripts
from gateway.keys import ApiKey
from gateway.ratelimit import RateLimiter
from gateway.redis_conn import make_client


class CountingPipe(redis_scripts._Pipe):
    """The limiter's pipelined connection, counting its socket writes (one per loop iteration
    with calls to send; sequential calls: one per call)."""

    writes = 0

    def _flush(self) -> None:
        CountingPipe.writes += 1
        super()._flush()


redis_scripts._Pipe = CountingPipe  # type: ignore[misc]


def make_key(**limits: int) -> ApiKey:
    return ApiKey(
        id="bench_" + secrets.token_hex(6),
        name="bench",
        key_hash="-",
        hint="-",
        created_at=datetime.now(UTC),
        **limits,  # type: ignore[arg-type]
    )


async def snapshot(probe: aioredis.Redis) -> tuple[int, int, int, float]:
    """(client socket writes, server EVALSHA calls, server commands, server EVALSHA usec)."""
    stats = (await probe.info("commandstats")).get("cmdstat_evalsha", {})
    total = int((await probe.info("stats"))["total_commands_processed"])
    calls, usec = int(stats.get("calls", 0)), float(stats.get("usec", 0))
    return CountingPipe.writes, calls, total, usec


def per_call(
    name: str, a: tuple[int, int, int, float], b: tuple[int, int, int, float], n: int
) -> str:
    sends, calls, total, usec = (y - x for x, y in zip(a, b, strict=True))
    # The probe's two INFO calls count as 2 commands; the EVALSHA itself as 1.
    inside = (total - 2) / n - 1
    return (
        f"  {name}  client {sends / n:.2f}   server EVALSHA {calls / n:.2f}"
        f"   (commands run inside Lua: {inside:.0f}; server time {usec / n:.1f} us)"
    )


async def count_round_trips(rl: RateLimiter, probe: aioredis.Redis, n: int = 200) -> list[str]:
    key = make_key(rpm=10**9, tpm=10**12, max_concurrency=10**6)
    await rl.settle(await rl.admit(key, 1, 1), 1)  # warm: scripts loaded, connection open
    s0 = await snapshot(probe)
    admissions = [await rl.admit(key, 100, 100) for _ in range(n)]
    s1 = await snapshot(probe)
    for a in admissions:
        await rl.settle(a, 50)
    s2 = await snapshot(probe)
    rows = [per_call("admit ", s0, s1, n), per_call("settle", s1, s2, n)]
    before = CountingPipe.writes
    free = make_key()
    for _ in range(n):
        await rl.settle(await rl.admit(free, 100, 100), 50)
    rows.append(f"  admit+settle, key without limits: {(CountingPipe.writes - before) / n:.2f}")
    return rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latency(rl: RateLimiter, concurrency: int, n: int) -> str:
    key = make_key(rpm=10**9, tpm=10**12, max_concurrency=10**6)
    admit_ms: list[float] = []
    settle_ms: list[float] = []
    per_worker = n // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter()
            a = await rl.admit(key, 100, 100)
            t1 = time.perf_counter()
            await rl.settle(a, 50)
            t2 = time.perf_counter()
            admit_ms.append((t1 - t0) * 1000)
            settle_ms.append((t2 - t1) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    done = per_worker * concurrency
    return (
        f"  {concurrency:>4}  {done:>6}  {pct(admit_ms, 0.5):>8.3f}  {pct(admit_ms, 0.99):>8.3f}"
        f"  {statistics.fmean(admit_ms):>8.3f}  {pct(settle_ms, 0.5):>9.3f}"
        f"  {pct(settle_ms, 0.99):>9.3f}  {done / elapsed:>10.0f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=4000, help="admissions per concurrency level")
    args = parser.parse_args()

    prefix = f"gwbench-{secrets.token_hex(4)}"
    client = make_client(args.redis_url, socket_timeout_s=2.0, connect_timeout_s=1.0)
    probe = make_client(args.redis_url, socket_timeout_s=2.0)
    rl = RateLimiter(client, prefix=prefix, deadline_s=2.0)
    info = await probe.info("server")
    try:
        print(
            f"admission bench: Redis {info['redis_version']} at {args.redis_url}, "
            f"redis-py {redis.__version__}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
        )
        print("round trips per call:")
        for row in await count_round_trips(rl, probe):
            print(row)
        print("latency, ms (admit+settle per request, one event loop, one pool):")
        print("  conc       n  admit50  admit99  admitavg  settle50  settle99  requests/s")
        for conc in (1, 32):
            print(await latency(rl, conc, args.n))
    finally:
        async for k in probe.scan_iter(match=f"{prefix}:*"):
            await probe.delete(k)
        await client.aclose()
        await probe.aclose()


if __name__ == "__main__":
    asyncio.run(main())
