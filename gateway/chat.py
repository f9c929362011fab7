"""Serving chat completions: a parsed request in, an OpenAI-shaped answer or SSE stream out."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, ServiceUnavailable
from gateway.images import ImageLoader
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, ChatMessage, ImageContentPart
from gateway.settings import Settings
from guards.content_filter import choice_results, prompt_filter_results
from model.engine import (
    ChatTurn,
    Engine,
    EngineEvent,
    EngineRequest,
    Finished,
    ImagePart,
    TextDelta,
    TextPart,
)

log = structlog.get_logger(__name__)


@dataclass
class PreparedChat:
    """A validated request, ready for the engine."""

    request: ChatCompletionRequest
    completion_id: str
    created: int
    model_id: str
    engine_requests: list[EngineRequest]
    prompt_tokens: int
    max_tokens: int
    started: float
    # Completion tokens known so far (exact for finished choices, one per delta otherwise):
    # what the rate limiter is settled with if the client leaves early.
    completion_tokens: int = 0

    @property
    def reserved_completion_tokens(self) -> int:
        return self.max_tokens * len(self.engine_requests)

    @property
    def used_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineFailed(GatewayError):
    status_code = 500
    error_type = "server_error"
    code = "engine_error"


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class ChatService:
    """Built once at start-up; one instance serves every chat request."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        images: ImageLoader,
        metrics: GatewayMetrics,
        system_fingerprint: str,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._images = images
        self._metrics = metrics
        self.system_fingerprint = system_fingerprint

    # -- intake ----------------------------------------------------------------------------
    async def prepare(
        self, body: bytes, authorize: Callable[[str], None] | None = None
    ) -> PreparedChat:
        """Validate, check the model (and the caller's right to it), load images, count tokens."""
        started = time.perf_counter()
        request, unknown = ChatCompletionRequest.parse(body)
        if unknown:
            log.info("unknown_request_fields_ignored", fields=sorted(unknown))
        model_id = self._settings.canonical_model_id(request.model)
        if model_id is None:
            raise ModelNotFound(
                f"The model '{request.model}' does not exist or you do not have access to it.",
                param="model",
            )
        if authorize is not None:
            authorize(model_id)
        self._check_counts(request)
        if not self._engine.ready():
            raise ServiceUnavailable("The model engine is not ready yet; retry shortly.")
        turns = await self._turns(request.messages)
        probe = EngineRequest("probe", turns, request.sampling_params(1))
        prompt_tokens = await asyncio.to_thread(self._engine.count_prompt_tokens, probe)
        max_tokens = self._max_tokens(request, prompt_tokens)
        completion_id = f"chat-{secrets.token_hex(16)}"
        engine_requests = [
            EngineRequest(f"{completion_id}-{i}", turns, request.sampling_params(max_tokens, i))
            for i in range(request.choices)
        ]
        return PreparedChat(
            request=request,
            completion_id=completion_id,
            created=int(time.time()),
            model_id=model_id,
            engine_requests=engine_requests,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            started=started,
        )

    def _check_counts(self, request: ChatCompletionRequest) -> None:
        limit = self._settings.max_messages
        if len(request.messages) > limit:
            raise InvalidRequest(
                f"Too many messages: {len(request.messages)} (at most {limit}).",
                param="messages",
                code="too_many_messages",
            )
        images = len(request.image_urls())
        cap = self._settings.max_images_per_request
        if images > cap:
            raise InvalidRequest(
                f"Too many images: {images} in this request (at most {cap}).",
                param="messages",
                code="too_many_images",
            )

    async def _turns(self, messages: list[ChatMessage]) -> tuple[ChatTurn, ...]:
        urls = [url for m in messages for url in m.image_urls()]
        loaded = iter(await asyncio.gather(*(self._images.load(u) for u in urls)))
        turns: list[ChatTurn] = []
        for message in messages:
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                parts: tuple[TextPart | ImagePart, ...] = (TextPart(message.content),)
            else:
                parts = tuple(
                    ImagePart(next(loaded)) if isinstance(p, ImageContentPart) else TextPart(p.text)
                    for p in message.content
                )
            turns.append(ChatTurn(role, parts))
        return tuple(turns)

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        context = self._engine.info.context_length
        room = context - prompt_tokens
        asked = request.requested_max_tokens
        if asked is None:
            if room < 1:
                raise _context_error(context, prompt_tokens, 1)
            return min(self._settings.default_max_tokens, room)
        if prompt_tokens + asked > context:
            raise _context_error(context, prompt_tokens, asked)
        return asked

    # -- non-streaming ---------------------------------------------------------------------
    async def complete(self, chat: PreparedChat) -> dict[str, Any]:
        outcomes = await asyncio.gather(
            *(self._collect(chat, r) for r in chat.engine_requests), return_exceptions=False
        )
        choices = []
        completion_tokens = 0
        for index, (text, finished) in enumerate(outcomes):
            completion_tokens += finished.completion_tokens
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finished.reason,
                    "content_filter_results": choice_results(),
                }
            )
        prompt_tokens = outcomes[0][1].prompt_tokens
        chat.prompt_tokens, chat.completion_tokens = prompt_tokens, completion_tokens
        self._count_tokens(prompt_tokens, completion_tokens)
        return {
            "id": chat.completion_id,
            "object": "chat.completion",
            "created": chat.created,
            "model": chat.model_id,
            "choices": choices,
            "prompt_filter_results": prompt_filter_results(),
            "usage": _usage(prompt_tokens, completion_tokens),
            "system_fingerprint": self.system_fingerprint,
        }

    async def _collect(self, chat: PreparedChat, request: EngineRequest) -> tuple[str, Finished]:
        pieces: list[str] = []
        first = True
        async for event in self._engine.generate(request):
            if isinstance(event, TextDelta):
                if first:
                    self._metrics.time_to_first_token.observe(time.perf_counter() - chat.started)
                    first = False
                pieces.append(event.text)
            else:
                return "".join(pieces), _checked(event)
        raise EngineFailed("The engine ended the stream without a finish event.")

    # -- streaming -------------------------------------------------------------------------
    async def stream(self, chat: PreparedChat) -> AsyncIterator[bytes]:
        """SSE bytes per the contract; closing this iterator cancels generation."""
        queue: asyncio.Queue[tuple[int, EngineEvent | BaseException]] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_pump(i, self._engine.generate(r), queue.put))
            for i, r in enumerate(chat.engine_requests)
        ]
        include_usage = chat.request.wants_usage_chunk
        first_chunk = True
        first_text = True
        open_choices = len(tasks)
        prompt_tokens = chat.prompt_tokens
        completion_tokens = 0
        deltas = [0] * len(tasks)
        try:
            # Each choice opens with the assistant role; the first chunk also carries
            # prompt_filter_results (never on a chunk with empty choices).
            for index in range(len(tasks)):
                chunk = self._chunk(chat, index, {"role": "assistant", "content": ""}, None)
                if first_chunk:
                    chunk["prompt_filter_results"] = prompt_filter_results()
                    first_chunk = False
                yield sse(self._with_usage_field(chunk, include_usage))
            while open_choices:
                index, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, TextDelta):
                    deltas[index] += 1
                    chat.completion_tokens += 1
                    if first_text:
                        self._metrics.time_to_first_token.observe(
                            time.perf_counter() - chat.started
                        )
                        first_text = False
                    chunk = self._chunk(chat, index, {"content": event.text}, None)
                    yield sse(self._with_usage_field(chunk, include_usage))
                    continue
                finished = _checked(event)
                open_choices -= 1
                prompt_tokens = finished.prompt_tokens
                completion_tokens += finished.completion_tokens
                chat.completion_tokens += finished.completion_tokens - deltas[index]
                chunk = self._chunk(chat, index, {}, finished.reason)
                yield sse(self._with_usage_field(chunk, include_usage))
            self._count_tokens(prompt_tokens, completion_tokens)
            if include_usage:
                yield sse(
                    {
                        "id": chat.completion_id,
                        "object": "chat.completion.chunk",
                        "created": chat.created,
                        "model": chat.model_id,
                        "system_fingerprint": self.system_fingerprint,
                        "choices": [],
                        "usage": _usage(prompt_tokens, completion_tokens),
                    }
                )
            yield sse("[DONE]")
        except GatewayError as exc:
            log.error("stream_failed", error=exc.message)
            yield sse(exc.envelope())
            yield sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _chunk(
        self, chat: PreparedChat, index: int, delta: dict[str, Any], finish: str | None
    ) -> dict[str, Any]:
        return {
            "id": chat.completion_id,
            "object": "chat.completion.chunk",
            "created": chat.created,
            "model": chat.model_id,
            "system_fingerprint": self.system_fingerprint,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                    "content_filter_results": choice_results(),
                }
            ],
        }

    @staticmethod
    def _with_usage_field(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        if include_usage:
            chunk["usage"] = None  # as OpenAI does on every chunk but the last
        return chunk

    def _count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._metrics.tokens_in.inc(prompt_tokens)
        self._metrics.tokens_out.inc(completion_tokens)


async def _pump(
    index: int,
    events: AsyncIterator[EngineEvent],
    put: Callable[[tuple[int, EngineEvent | BaseException]], Awaitable[None]],
) -> None:
    try:
        async for event in events:
            await put((index, event))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # surfaced to the stream, which reports it
        await put((index, exc))
    finally:
        closer = getattr(events, "aclose", None)
        if closer is not None:
            await closer()


def _checked(event: Finished) -> Finished:
    if event.reason == "error":
        raise EngineFailed(f"The model failed to generate: {event.error or 'unknown error'}")
    if event.reason == "cancelled":
        raise ServiceUnavailable("The request was cancelled by the engine (shutting down).")
    return event


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _context_error(context: int, prompt_tokens: int, asked: int) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
        "completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )
