"""Client-side CPU per streamed call against the zero-delay mock: httpx, aiohttp, model.http1, and
the engine (model.http1 + SSE parsing + events).

Why the upstream engine has its own HTTP client. Start the mock first, then:

    python bench/gateway_overhead/mock_upstream.py --port 9105 &
    python bench/gateway_overhead/client_micro.py http://127.0.0.1:9105/v1 --concurrency 32

Each variant streams the same request and parses every SSE event; CPU is this process's
`time.process_time()` per call (the mock runs in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

from model.engine import ChatTurn, EngineRequest, SamplingParams, TextPart
from model.http1 import ConnectionPool
from model.openai_wire import SSEParser
from model.upstream import OpenAIUpstreamEngine, UpstreamConfig

BODY = json.dumps(
    {
        "model": "mock",
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 16,
    }
).encode()
HEADERS = {"content-type": "application/json"}


def parse(parser: SSEParser, chunk: bytes) -> None:
    for data in parser.feed(chunk):
        if data != b"[DONE]":
            json.loads(data)


async def measure(
    call: Callable[[int], Awaitable[None]], calls: int, concurrency: int
) -> tuple[float, float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await call(i)

    for i in range(min(100, calls)):  # warm the pool
        await one(i)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    return (time.process_time() - cpu) * 1000 / calls, calls / (time.perf_counter() - wall)


async def main(base: str, calls: int, concurrency: int) -> None:
    url = base.rstrip("/") + "/chat/completions"
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:

        async def via_httpx(_: int) -> None:
            async with client.stream("POST", url, content=BODY, headers=HEADERS) as resp:
                parser = SSEParser()
                async for chunk in resp.aiter_raw():
                    parse(parser, chunk)

        report("httpx 0.28 AsyncClient", await measure(via_httpx, calls, concurrency))

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def via_aiohttp(_: int) -> None:
            async with session.post(url, data=BODY, headers=HEADERS) as resp:
                parser = SSEParser()
                while chunk := await resp.content.readany():
                    parse(parser, chunk)

        report("aiohttp ClientSession", await measure(via_aiohttp, calls, concurrency))

    pool = ConnectionPool(base, size=64, connect_timeout=5.0, pool_timeout=10.0, read_timeout=120.0)
    head = f"POST /{url.split('/', 3)[3]} HTTP/1.1\r\nhost: {url.split('/')[2]}\r\n".encode()
    head += b"content-type: application/json"
    loop = asyncio.get_running_loop()

    async def via_http1(_: int) -> None:
        deadline = loop.time() + 60
        resp = await pool.request(head, BODY, deadline)
        try:
            parser = SSEParser()
            while chunk := await resp.read(deadline):
                parse(parser, chunk)
        finally:
            resp.release()

    report("model.http1 ConnectionPool", await measure(via_http1, calls, concurrency))
    await pool.close()

    engine = OpenAIUpstreamEngine(
        UpstreamConfig(model_id="m", api_base=base, upstream_model="mock", pool_size=64)
    )
    await engine.start()
    turns = (ChatTurn("user", (TextPart("Say hello in a few words."),)),)

    async def via_engine(i: int) -> None:
        async for _ in engine.generate(EngineRequest(f"r{i}", turns, SamplingParams(16))):
            pass

    report("OpenAIUpstreamEngine", await measure(via_engine, calls, concurrency))
    await engine.stop()


def report(name: str, result: tuple[float, float]) -> None:
    print(f"| {name} | {result[0]:.3f} | {result[1]:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("base", help="the mock's api_base, e.g. http://127.0.0.1:9105/v1")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    print(f"calls {args.calls}, concurrency {args.concurrency}\n")
    print("| client | CPU ms per call | calls/s |\n| --- | ---: | ---: |")
    run(main(args.base, args.calls, args.concurrency))
