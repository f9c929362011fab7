"""An engine over `litellm.acompletion(stream=True)`, for providers that need translation.

Same contract as `model.upstream.OpenAIUpstreamEngine` (the same errors before the first delta,
`Finished("error")` after it, retries only before the first delta, the same token counting),
but the request goes through litellm, so any provider it knows (Bedrock, Vertex, Azure,
Anthropic, ...) can sit behind a route. It costs several times the CPU per call of the
`upstream` engine (bench/NOTES.md), so OpenAI-compatible upstreams should use `upstream` routes.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from model.engine import Engine, EngineEvent, EngineInfo, EngineRequest, TextDelta
from model.errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from model.openai_wire import (
    PromptCounter,
    StreamState,
    build_messages,
    finished,
    sampling_fields,
    with_retries,
)


@dataclass(frozen=True)
class LiteLLMConfig:
    model_id: str  # the served name
    litellm_model: str  # e.g. "bedrock/meta.llama3-2-90b-instruct-v1:0", "openai/<name>"
    api_key: str | None = None
    api_base: str | None = None
    # Extra keyword arguments for acompletion (api_version, aws_region_name, ...).
    kwargs: dict[str, Any] = field(default_factory=dict)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    total_timeout_s: float = 600.0
    retries: int = 2
    retry_backoff_s: float = 0.05
    context_length: int = 131_072
    tokenizer_path: Path | None = None


def _import_litellm() -> Any:
    # No egress from gateway pods: without this, importing litellm blocks for seconds
    # retrying a download of its model cost map.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def map_litellm_error(exc: BaseException) -> UpstreamError:
    """litellm's exceptions (subclasses of openai's) -> ours, by their HTTP meaning."""
    if isinstance(exc, UpstreamError):
        return exc
    # litellm wraps stream failures (MidStreamFallbackError around APIConnectionError around
    # the real cause): an unparsable answer is the upstream's fault, not a connection problem.
    if any(isinstance(cause, json.JSONDecodeError) for cause in _causes(exc)):
        return UpstreamBadResponse(f"The upstream sent an answer that is not JSON: {exc}")
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return UpstreamTimeout("The upstream call exceeded its timeout.")
    name = type(exc).__name__
    message = str(getattr(exc, "message", None) or exc) or name
    if name in ("Timeout", "APITimeoutError"):
        return UpstreamTimeout(f"The upstream did not answer in time: {message}")
    status = getattr(exc, "status_code", None)
    if name == "APIConnectionError" or isinstance(exc, httpx.TransportError):
        return UpstreamUnavailable(f"Cannot reach the upstream: {message}")
    if isinstance(status, int) and (status == 429 or status >= 500):
        return UpstreamUnavailable(f"The upstream answered HTTP {status}: {message}")
    return UpstreamBadResponse(f"The upstream refused the request ({name}): {message}")


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 16:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        original = getattr(current, "original_exception", None)
        todo += [current.__cause__, current.__context__]
        if isinstance(original, BaseException):
            todo.append(original)
    return seen


class LiteLLMEngine(Engine):
    """`Engine` over litellm; litellm is imported at `start()` (it takes seconds)."""

    def __init__(self, config: LiteLLMConfig) -> None:
        self.config = config
        self._litellm: Any = None
        self._counter = PromptCounter(config.tokenizer_path)
        self._info = EngineInfo(
            model_id=config.model_id,
            context_length=config.context_length,
            max_batch_size=0,
            device="litellm",
            dtype="upstream",
            extra={"litellm_model": config.litellm_model},
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def cheap_token_count(self) -> bool:
        return not self._counter.exact

    def ready(self) -> bool:
        return self._litellm is not None

    async def start(self) -> None:
        if self._litellm is None:
            await asyncio.to_thread(self._counter.load)
            self._litellm = await asyncio.to_thread(_import_litellm)

    async def stop(self) -> None:
        self._litellm = None

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self._counter(request.messages)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        cfg = self.config
        deadline = asyncio.get_running_loop().time() + cfg.total_timeout_s
        call: dict[str, Any] = {
            "model": cfg.litellm_model,
            "messages": await build_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
            "timeout": httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
            "num_retries": 0,  # ours: only before the first delta
            # Providers without seed or penalties: drop those fields rather than fail.
            "drop_params": True,
            **sampling_fields(request),
            **cfg.kwargs,
        }
        # Traceable end to end, as on the `upstream` path (the engine gateway echoes it).
        call["extra_headers"] = {
            **call.get("extra_headers", {}),
            "x-request-id": request.request_id,
        }
        if cfg.api_key:
            call["api_key"] = cfg.api_key
        if cfg.api_base:
            call["api_base"] = cfg.api_base
        state = StreamState()
        events = with_retries(
            lambda: self._attempt(call, deadline, state),
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
        self, call: dict[str, Any], deadline: float, state: StreamState
    ) -> AsyncGenerator[EngineEvent, None]:
        litellm = self._litellm
        if litellm is None:
            raise UpstreamUnavailable("The litellm engine is not started.")
        try:
            async with asyncio.timeout_at(deadline):
                stream = await litellm.acompletion(**call)
        except Exception as exc:
            raise map_litellm_error(exc) from exc
        try:
            while True:
                try:
                    # The deadline wraps each await, never a yield (see upstream._attempt).
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                for event in _chunk_events(chunk, state):
                    yield event
            state.done = True
        except Exception as exc:
            raise map_litellm_error(exc) from exc
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                await closer()


def _chunk_events(chunk: Any, state: StreamState) -> list[EngineEvent]:
    usage = getattr(chunk, "usage", None)
    if usage is not None:
        state.take_usage(usage if isinstance(usage, dict) else _plain(usage))
    events: list[EngineEvent] = []
    for choice in getattr(chunk, "choices", None) or ():
        if getattr(choice, "index", 0) != 0:
            continue
        delta = getattr(choice, "delta", None)
        text = getattr(delta, "content", None)
        if isinstance(text, str) and text:
            state.deltas += 1
            events.append(TextDelta(text))
        if getattr(choice, "finish_reason", None):
            state.finish = choice.finish_reason
    return events


def _plain(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": getattr(usage, "prompt_tokens", None),
        "completion_tokens": getattr(usage, "completion_tokens", None),
    }
