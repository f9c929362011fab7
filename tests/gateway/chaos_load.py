"""Load for the chaos tests: many concurrent OpenAI clients with a realistic mix of requests
(prompts of 1-1,500 characters, images, streaming and not, clients that leave mid-stream), and
a record of what each request got, with when it was sent and answered."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from tests.gateway.test_e2e_openai import png_data_url

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
TEXT = (
    "the gateway answers every request in order while the model looks at a picture of a red "
    "boat on blue water near old stone houses and counts seven birds flying south before rain"
)
WORDS = tuple(TEXT.split(" "))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def prompt(rng: random.Random, length: int) -> str:
    words: list[str] = []
    size = 0
    while size < length:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


@dataclass(frozen=True)
class Planned:
    """One request of the mix."""

    body: dict[str, Any]
    leaves_early: bool = False  # the client disconnects after the first chunk (streams only)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def mixed_request(rng: random.Random, images: list[str], *, leave_rate: float = 0.02) -> Planned:
    """Text of 1-1,500 characters (lengths spread log-uniformly: short and long prompts meet in
    one batch), an image in one request of four, half of them streamed."""
    text = prompt(rng, int(1500 ** rng.random()))
    content: str | list[dict[str, Any]] = text
    if rng.random() < 0.25:
        content = [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": rng.choice(images)}},
        ]
    stream = rng.random() < 0.5
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randint(1, 6),
        "stream": stream,
    }
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return Planned(body, leaves_early=stream and rng.random() < leave_rate)


def light_requests(seed: int = 0) -> Iterator[Planned]:
    """An endless stream of cheap requests (short prompts, 1-2 tokens, a third streamed)."""
    rng = random.Random(seed)
    while True:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt(rng, rng.randint(1, 80))}],
            "max_tokens": rng.randint(1, 2),
            "stream": rng.random() < 0.33,
        }
        yield Planned(body)


def sample_images(count: int = 4) -> list[str]:
    colors = [(200, 40, 40), (30, 160, 60), (20, 40, 220), (240, 240, 20), (0, 0, 0)]
    return [png_data_url(colors[i % len(colors)]) for i in range(count)]


@dataclass
class Outcome:
    status: int  # 0: no HTTP answer (connection refused or reset)
    sent: float  # time.monotonic()
    answered: float
    headers: httpx.Headers | None = None
    error: str | None = None  # the error body, or an error event inside a 200 stream
    left_early: bool = False

    @property
    def server_error(self) -> bool:
        """A 5xx, or a 200 stream that carried an error instead of finishing."""
        return self.status >= 500 or (self.status == 200 and self.error is not None)


async def send(client: httpx.AsyncClient, url: str, key: str, planned: Planned) -> Outcome:
    sent = time.monotonic()
    try:
        if not planned.stream:
            resp = await client.post(url, json=planned.body, headers=auth(key))
            error = None if resp.status_code == 200 else resp.text
            return Outcome(resp.status_code, sent, time.monotonic(), resp.headers, error)
        async with client.stream("POST", url, json=planned.body, headers=auth(key)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Outcome(resp.status_code, sent, time.monotonic(), resp.headers, resp.text)
            error, done = await _read_stream(resp, planned.leaves_early)
            if planned.leaves_early:
                return Outcome(200, sent, time.monotonic(), resp.headers, error, left_early=True)
            if error is None and not done:
                error = "the stream ended without [DONE]"
            return Outcome(200, sent, time.monotonic(), resp.headers, error)
    except httpx.TransportError as exc:
        return Outcome(0, sent, time.monotonic(), None, f"{type(exc).__name__}: {exc}")


async def _read_stream(resp: httpx.Response, leave_early: bool) -> tuple[str | None, bool]:
    """(an error event's text, whether [DONE] came); returns after the first chunk when the
    client leaves early (the caller's `async with` then closes the connection)."""
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return None, True
        if "error" in json.loads(data):
            return data, False
        if leave_early:
            return None, False
    return None, False


async def run_clients(
    url: str,
    key: str,
    plans: Iterable[Planned],
    concurrency: int,
    *,
    timeout: float = 120,
    stop: Callable[[], bool] | None = None,
) -> list[Outcome]:
    """Send `plans` through `concurrency` clients, each one request at a time (a closed loop),
    until all are sent or `stop()` says so (then each client finishes its request)."""
    queue = iter(plans)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            for planned in queue:
                if stop is not None and stop():
                    return
                outcomes.append(await send(client, url, key, planned))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts = Counter(o.status for o in outcomes)
    errors = Counter((o.status, (o.error or "")[:300]) for o in outcomes if o.server_error)
    lines = [f"statuses: {dict(sorted(counts.items()))}"]
    lines += [f"  {n} x {status}: {text}" for (status, text), n in errors.most_common(5)]
    return "\n".join(lines)
