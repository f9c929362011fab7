"""An engine that forwards to an OpenAI-compatible upstream: the CPU gateway's fast path.

`OpenAIUpstreamEngine` posts to `<api_base>/chat/completions` through one pool of keep-alive
connections per route (`model.http1`, created at start; why not httpx or aiohttp: see the
class). A streaming request goes up with `stream: true` and `stream_options.include_usage`;
the SSE bytes are parsed incrementally and each content delta is yielded as soon as its event
is complete (nothing is re-buffered), then one `Finished`. The deltas of one read are merged
(`coalesce_deltas` here): when the upstream outruns the gateway, the output guards and the client
see one piece per read instead of one per token, the same text a little sooner.
A non-streaming request goes up
with `stream: false` (the gateway needs the whole answer before its output guards anyway): one
JSON answer to parse instead of an event per token, and the upstream writes it once. It is
silent until it is whole, so `read_timeout_s` (the longest silence) does not apply to it; the
total timeout does.

Errors: before the first delta, `generate` raises an `UpstreamError` subclass (defined with the
wire format in `model.openai_wire`, shared with the litellm engine: 502 bad answer,
503 unavailable, 504 timeout) after retrying what is safe to retry; after the first delta it
ends with `Finished("error", ...)` carrying the message (the client already has text, so a
retry would duplicate it).

Token counts: the upstream's `usage` when it sends one. Otherwise the prompt is counted like
`count_prompt_tokens` (exact with the route's `tokenizer_path`, else the estimate in
`model.openai_wire`: ceil(text characters / 4) + 1 per image) and the completion is the number
of non-empty content events, counted before merging (one event is one token on vLLM, TGI
and this gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from model.engine import Engine, EngineEvent, EngineInfo, EngineRequest, TextDelta
from model.errors import (
    ConnectTimeout,
    HTTPError,
    ReadTimeout,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from model.http1 import ConnectionPool, Response
from model.openai_wire import (
    PromptCounter,
    SSEParser,
    StreamState,
    build_messages,
    finished,
    json_bytes,
    sampling_fields,
    sse_events,
    status_error,
    whole_answer,
    with_retries,
)

_MAX_ERROR_BODY = 64 * 1024
_MAX_JSON_BODY = 16 * 1024 * 1024
# After [DONE]: how long and how much to read to keep the pooled connection alive.
_DRAIN_S = 0.25
_DRAIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class UpstreamConfig:
    """One route's upstream, already resolved (the key read from its env var or file)."""

    model_id: str  # the served name (responses and EngineInfo)
    api_base: str  # e.g. http://engine:8000/v1 (".../chat/completions" is appended)
    upstream_model: str | None = None  # the name sent upstream; default: model_id
    api_key: str | None = None
    connect_timeout_s: float = 5.0
    # Longest silence of a stream: time to first byte, gap between chunks (a non-streamed
    # answer comes whole at the end: only total_timeout_s bounds it).
    read_timeout_s: float = 120.0
    total_timeout_s: float = 600.0  # the whole call: retries and the full stream
    pool_timeout_s: float = 10.0  # waiting for a free pooled connection
    pool_size: int = 100
    retries: int = 2
    retry_backoff_s: float = 0.05
    context_length: int = 131_072
    tokenizer_path: Path | None = None

    @property
    def sent_model(self) -> str:
        return self.upstream_model or self.model_id


class OpenAIUpstreamEngine(Engine):
    """`Engine` over an OpenAI-compatible `/chat/completions` (vLLM, TGI, this gateway, ...).

    The client is `model.http1` (an asyncio protocol with httptools), not httpx or aiohttp: it
    costs the least CPU per streamed call of the three, and the upstream call was the largest
    part of a guards-off gateway request (bench/gateway_overhead/client_micro.py; figures in
    bench/NOTES.md)."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._pool: ConnectionPool | None = None
        self._url = urlsplit(config.api_base.rstrip("/") + "/chat/completions")
        if self._url.scheme not in ("http", "https") or not self._url.hostname:
            raise ValueError(f"api_base must be an http(s) URL: {config.api_base!r}")
        self._counter = PromptCounter(config.tokenizer_path)
        path = self._url.path + (f"?{self._url.query}" if self._url.query else "")
        headers = {
            "host": self._url.netloc.rpartition("@")[2],
            "content-type": "application/json",
            "accept": "text/event-stream",
            # A compressed SSE stream is buffered by the compressor: ask for none.
            "accept-encoding": "identity",
        }
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        if any(c in v for v in headers.values() for c in "\r\n"):
            raise ValueError("a header value for the upstream holds a line break")
        # The request head, encoded once; each call adds x-request-id and content-length.
        self._head = f"POST {path} HTTP/1.1\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()
        )
        self._info = EngineInfo(
            model_id=config.model_id,
            context_length=config.context_length,
            max_batch_size=config.pool_size,
            device="upstream",
            dtype="upstream",
            extra={"api_base": config.api_base, "upstream_model": config.sent_model},
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def cheap_token_count(self) -> bool:
        """True when count_prompt_tokens is a few microseconds (no need for a thread)."""
        return not self._counter.exact

    def ready(self) -> bool:
        return self._pool is not None

    async def start(self) -> None:
        if self._pool is not None:
            return
        await asyncio.to_thread(self._counter.load)
        cfg = self.config
        # No proxies from the environment: they are for egress to the internet, not to engines.
        self._pool = ConnectionPool(
            self._url.geturl(),
            size=cfg.pool_size,
            connect_timeout=cfg.connect_timeout_s,
            pool_timeout=cfg.pool_timeout_s,
            read_timeout=cfg.read_timeout_s,
        )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self._counter(request.messages)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        cfg = self.config
        deadline = asyncio.get_running_loop().time() + cfg.total_timeout_s
        body: dict[str, object] = {
            "model": cfg.sent_model,
            "messages": await build_messages(request),
            "stream": request.stream,
        }
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        payload = json_bytes(body | sampling_fields(request))
        head = self._head + b"x-request-id: " + request.request_id.encode("latin-1")
        # A non-streamed answer is silent until it is whole: only the total timeout bounds it.
        read_timeout = cfg.read_timeout_s if request.stream else cfg.total_timeout_s
        state = StreamState()
        events = with_retries(
            lambda: self._attempt(payload, head, deadline, read_timeout, state),
            state,
            lambda reason, error: finished(self, request, state, reason, error),
            retries=cfg.retries,
            backoff_s=cfg.retry_backoff_s,
            deadline=deadline,
        )
        async with aclosing(events):
            async for event in events:
                yield event

    async def _attempt(
        self, payload: bytes, head: bytes, deadline: float, read_timeout: float, state: StreamState
    ) -> AsyncGenerator[EngineEvent, None]:
        """One HTTP call. The total deadline is checked around each await, never across a
        yield: a timeout scope spanning a yield would cancel whatever the consumer awaits."""
        pool = self._pool
        if pool is None:
            raise UpstreamUnavailable("The upstream engine is not started.")
        try:
            response = await pool.request(head, payload, deadline, read_timeout)
        except (TimeoutError, HTTPError) as exc:
            raise _transport_error(exc, "Cannot reach the upstream") from exc
        try:
            if response.status != 200:
                body = await _read(response, _MAX_ERROR_BODY, deadline)
                raise status_error(response.status, body)
            kind = response.content_type
            if kind.startswith("application/json"):
                # An upstream that ignores `stream: true`: take the whole answer at once.
                for event in whole_answer(await _read(response, _MAX_JSON_BODY, deadline), state):
                    yield event
                return
            if not kind.startswith("text/event-stream"):
                raise UpstreamBadResponse(f"The upstream answered with content-type {kind!r}.")
            parser = SSEParser()
            while not state.done:
                chunk = await response.read(deadline)
                if not chunk:
                    break
                events, failure = [], None
                for data in parser.feed(chunk):
                    try:
                        events.extend(sse_events(data, state))
                    except UpstreamError as exc:
                        failure = exc  # after what came before it in this read
                        break
                    if state.done:
                        break
                for event in coalesce_deltas(events):
                    yield event
                if failure is not None:
                    raise failure
            if not state.done and state.finish is None:
                raise UpstreamUnavailable("The upstream closed the stream before it finished.")
            await _drain(response, deadline)
        except (TimeoutError, HTTPError) as exc:
            raise _transport_error(exc, "The upstream connection failed") from exc
        finally:
            # Back to the pool only when read to its end; otherwise the connection is closed,
            # which is also how a client that left cancels the generation upstream.
            response.release()


async def _drain(response: Response, deadline: float) -> None:
    """Read the end of the body after [DONE] (the chunked terminator, usually already here) so
    that the connection can go back to the pool: a new TCP connection per request was a large
    share of the gateway's CPU under load (py-spy; bench/NOTES.md)."""
    until = min(deadline, asyncio.get_running_loop().time() + _DRAIN_S)
    left = _DRAIN_BYTES
    with contextlib.suppress(TimeoutError, HTTPError):
        while left >= 0:
            chunk = await response.read(until)
            if not chunk:
                return
            left -= len(chunk)


async def _read(response: Response, limit: int, deadline: float) -> bytes:
    out = bytearray()
    while chunk := await response.read(deadline):
        out += chunk
        if len(out) > limit:
            raise UpstreamBadResponse(f"The upstream's answer is over {limit} bytes.")
    return bytes(out)


def _transport_error(exc: BaseException, what: str) -> UpstreamError:
    if isinstance(exc, ConnectTimeout):
        # Nothing was sent: another try (another pod behind the Service) is safe.
        return UpstreamTimeout(f"Timed out connecting to the upstream ({exc}).", retryable=True)
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeout("The upstream did not answer within the read timeout.")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The upstream call exceeded its total timeout.")
    return UpstreamUnavailable(f"{what}: {exc}")


def coalesce_deltas(events: list[EngineEvent]) -> list[EngineEvent]:
    """The events of one read from the upstream, adjacent text deltas merged into one (their
    logprobs in order; tool-call deltas never merged). They arrived together, so none is sent
    later; an upstream that outruns the gateway (a token per event) then costs one trip through
    the output guards and one chunk to the client per read, not per token."""
    if len(events) < 2:
        return events
    merged: list[EngineEvent] = []
    for plain_text, group in groupby(events, _is_plain_text):
        run = list(group)
        if plain_text and len(run) > 1:
            deltas = cast(list[TextDelta], run)
            logprobs = tuple(entry for delta in deltas for entry in delta.logprobs)
            text = "".join(delta.text for delta in deltas)
            merged.append(TextDelta(text, logprobs, tokens=sum(d.tokens for d in deltas)))
        else:
            merged.extend(run)
    return merged


def _is_plain_text(event: EngineEvent) -> bool:
    return isinstance(event, TextDelta) and not event.tool_calls
