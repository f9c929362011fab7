"""Serving chat completions: a parsed request in, an OpenAI-shaped answer or SSE stream out."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from gateway.audit import AuditContext
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, ServiceUnavailable
from gateway.image_tokens import ImageTokenCounter
from gateway.images import ImageLoader
from gateway.metrics import GatewayMetrics
from gateway.model_routes import ModelRouter, gateway_error
from gateway.moderation import ContentFiltered, GuardServices, policy_header
from gateway.protocol import ChatCompletionRequest, ChatMessage, ImageContentPart
from gateway.settings import Settings
from guards.base import GuardInput
from guards.decision import Decision
from guards.pipeline import GuardPipeline, log_decision
from guards.policy import Policy
from model.engine import (
    ChatTurn,
    Engine,
    EngineOverloaded,
    EngineRequest,
    Finished,
    ImagePart,
    TextDelta,
    TextPart,
)
from model.openai_wire import UpstreamError

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class PreparedChat:
    """A validated request, ready for the engine."""

    request: ChatCompletionRequest
    completion_id: str
    created: int
    model_id: str
    engine: Engine
    engine_requests: list[EngineRequest]
    turns: tuple[ChatTurn, ...]
    policy: Policy
    pipeline: GuardPipeline
    # Text tokens plus `image_tokens` (what usage reports and TPM reserves).
    prompt_tokens: int
    max_tokens: int
    started: float
    # Vision tokens of the request's images, and how many `<|image|>` placeholders the text
    # count has (each image is counted as its vision tokens instead of its placeholder).
    image_tokens: int = 0
    image_placeholders: int = 0
    # Completion tokens known so far (exact for finished choices, one per delta otherwise):
    # what the rate limiter is settled with if the client leaves early.
    completion_tokens: int = 0
    input_decision: Decision | None = None
    audit_context: AuditContext | None = None

    def prompt_filter_results(self) -> list[dict[str, Any]]:
        if self.input_decision is None:
            return self.pipeline.safe_decision("input").prompt_filter_results()
        return self.input_decision.prompt_filter_results()

    def with_images(self, text_tokens: int) -> int:
        """Prompt tokens for usage and TPM: the text's, each image as its vision tokens."""
        return text_tokens - self.image_placeholders + self.image_tokens

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


class ChatService:
    """Built once at start-up; one instance serves every chat request."""

    def __init__(
        self,
        settings: Settings,
        router: ModelRouter,
        images: ImageLoader,
        metrics: GatewayMetrics,
        system_fingerprint: str,
        guards: GuardServices,
    ) -> None:
        self._settings = settings
        self._guards = guards
        self._router = router
        self._images = images
        self._metrics = metrics
        self.system_fingerprint = system_fingerprint
        self._image_counters: dict[int, ImageTokenCounter] = {}

    # -- intake ----------------------------------------------------------------------------
    async def prepare(
        self,
        body: bytes,
        authorize: Callable[[str], None] | None = None,
        policy_name: str | None = None,
    ) -> PreparedChat:
        """Validate, check the model (and the caller's right to it), load images, count tokens."""
        started = time.perf_counter()
        request, unknown = ChatCompletionRequest.parse(body)
        if unknown:
            log.info("unknown_request_fields_ignored", fields=sorted(unknown))
        route = self._router.resolve(request.model)
        if route is None:
            raise ModelNotFound(
                f"The model '{request.model}' does not exist or you do not have access to it.",
                param="model",
            )
        model_id, engine = route.model, route.engine
        if authorize is not None:
            authorize(model_id)
        # The key's policy wins; else the route's; else the default.
        policy = self._guards.policy(policy_name or route.policy)
        self._check_counts(request)
        if not engine.ready():
            raise ServiceUnavailable("The model engine is not ready yet; retry shortly.")
        turns = await self._turns(request.messages)
        probe = EngineRequest("probe", turns, request.sampling_params(1))
        if getattr(engine, "cheap_token_count", False):
            prompt_tokens = engine.count_prompt_tokens(probe)
        else:  # tokenizing a long prompt must not block the event loop
            prompt_tokens = await asyncio.to_thread(engine.count_prompt_tokens, probe)
        # The context check is on the text sequence: images go to cross-attention.
        max_tokens = self._max_tokens(request, prompt_tokens, engine.info.context_length)
        image_tokens = self.image_tokens(engine, probe.images)
        completion_id = f"chat-{secrets.token_hex(16)}"
        engine_requests = [
            EngineRequest(
                f"{completion_id}-{i}",
                turns,
                request.sampling_params(max_tokens, i),
                stream=bool(request.stream),
            )
            for i in range(request.choices)
        ]
        return PreparedChat(
            request=request,
            completion_id=completion_id,
            created=int(time.time()),
            model_id=model_id,
            engine=engine,
            engine_requests=engine_requests,
            turns=turns,
            policy=policy,
            pipeline=self._guards.pipeline(policy),
            prompt_tokens=prompt_tokens - len(probe.images) + image_tokens,
            max_tokens=max_tokens,
            started=started,
            image_tokens=image_tokens,
            image_placeholders=len(probe.images),
        )

    def image_tokens(self, engine: Engine, images: list[Any]) -> int:
        """Vision tokens of `images` for this engine (see gateway.image_tokens)."""
        if not images:
            return 0
        counter = self._image_counters.get(id(engine))
        if counter is None:
            counter = self._image_counters[id(engine)] = ImageTokenCounter.from_engine(engine)
        return counter.count(images)

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

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int, context: int) -> int:
        room = context - prompt_tokens
        asked = request.requested_max_tokens
        if asked is None:
            if room < 1:
                raise _context_error(context, prompt_tokens, 1)
            return min(self._settings.default_max_tokens, room)
        if prompt_tokens + asked > context:
            raise _context_error(context, prompt_tokens, asked)
        return asked

    # -- guards ----------------------------------------------------------------------------
    async def check_input(self, chat: PreparedChat) -> None:
        """Run the policy's input guards; a blocked prompt is Azure's 400 content_filter."""
        (decision,) = await chat.pipeline.run("input", [GuardInput("input", chat.turns)])
        chat.input_decision = decision
        log_decision(decision)
        # The text is built only if the policy keeps a content sample.
        self._guards.audit_decision(
            decision,
            chat.policy,
            chat.audit_context,
            lambda: GuardInput("input", chat.turns).text_to_check(),
        )
        if decision.blocked:
            raise ContentFiltered(
                decision.error_body(), headers={"x-policy": policy_header(chat.policy)}
            )

    async def check_output(self, chat: PreparedChat, texts: list[str]) -> list[Decision]:
        items = [GuardInput("output", chat.turns, completion=text) for text in texts]
        decisions = await chat.pipeline.run("output", items)
        for decision, text in zip(decisions, texts, strict=True):
            log_decision(decision)
            self._guards.audit_decision(decision, chat.policy, chat.audit_context, text)
        return decisions

    def stream_auditor(self, chat: PreparedChat) -> Callable[[Decision, str], None]:
        """For a streamed choice: audit one output decision with the text it judged."""

        def audit(decision: Decision, text: str) -> None:
            self._guards.audit_decision(decision, chat.policy, chat.audit_context, text)

        return audit

    # -- non-streaming ---------------------------------------------------------------------
    async def complete(self, chat: PreparedChat) -> dict[str, Any]:
        requests = chat.engine_requests
        try:
            if len(requests) == 1:  # the usual n=1: no task for gather to wrap it in
                outcomes = [await self._collect(chat, requests[0])]
            else:
                outcomes = await _all_or_nothing([self._collect(chat, r) for r in requests])
        except Exception as exc:
            raise engine_failure(exc) from exc
        decisions = await self.check_output(chat, [text for text, _ in outcomes])
        choices = []
        completion_tokens = 0
        for index, ((text, finished), decision) in enumerate(zip(outcomes, decisions, strict=True)):
            completion_tokens += finished.completion_tokens
            # A withheld completion: finish_reason content_filter, and none of its text.
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": "" if decision.blocked else text},
                    "logprobs": None,
                    "finish_reason": "content_filter" if decision.blocked else finished.reason,
                    "content_filter_results": decision.content_filter_results(),
                }
            )
        prompt_tokens = chat.with_images(outcomes[0][1].prompt_tokens)
        chat.prompt_tokens, chat.completion_tokens = prompt_tokens, completion_tokens
        self.count_tokens(prompt_tokens, completion_tokens)
        return {
            "id": chat.completion_id,
            "object": "chat.completion",
            "created": chat.created,
            "model": chat.model_id,
            "choices": choices,
            "prompt_filter_results": chat.prompt_filter_results(),
            "usage": usage_body(prompt_tokens, completion_tokens, chat.image_tokens),
            "system_fingerprint": self.system_fingerprint,
        }

    async def _collect(self, chat: PreparedChat, request: EngineRequest) -> tuple[str, Finished]:
        pieces: list[str] = []
        first = True
        events = chat.engine.generate(request)
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    if first:
                        self.observe_first_token(chat)
                        first = False
                    pieces.append(event.text)
                else:
                    return "".join(pieces), checked_finish(event)
        finally:
            # Closed here, at once: a generator left to the garbage collector is closed later
            # by the loop's finalizer hook, with a thread-safe wake-up and a task of its own.
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()
        raise server_failure("the engine ended the stream without a finish event")

    def observe_first_token(self, chat: PreparedChat) -> None:
        self._metrics.time_to_first_token.observe(time.perf_counter() - chat.started)

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._metrics.tokens_in.inc(prompt_tokens)
        self._metrics.tokens_out.inc(completion_tokens)


async def _all_or_nothing(work: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Like gather, but when one fails the others are cancelled (they would generate for
    nothing, with the request's concurrency slot already given back)."""
    tasks = [asyncio.create_task(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_failure(exc: BaseException) -> GatewayError:
    """An engine's exception as the client's error: upstream 502/503/504, overload 503."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, UpstreamError):
        return gateway_error(exc)
    if isinstance(exc, EngineOverloaded):
        return ServiceUnavailable(
            f"The model engine is at capacity ({exc}); retry shortly.",
            code="engine_overloaded",
            headers={"Retry-After": "1"},
        )
    return server_failure(exc)


def server_failure(cause: BaseException | str | None) -> EngineFailed:
    """A 500 that says the server failed and names the request; the cause is logged here with
    the request id, and its text is never shown to the client."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if isinstance(cause, BaseException):
        log.error(
            "engine_failed",
            request_id=request_id,
            error_type=type(cause).__name__,
            exc_info=cause,
        )
    else:
        log.error("engine_failed", request_id=request_id, error=cause or "unknown error")
    ref = f" (request id {request_id})" if request_id else ""
    return EngineFailed(
        f"The server failed while generating the completion{ref}. This is not a problem with "
        "your request; retry it, and quote the request id if you contact the operator."
    )


def checked_finish(event: Finished) -> Finished:
    if event.reason == "error":
        if event.fault == "request":  # the request's own input (the engine wrote the message)
            raise InvalidRequest(
                f"The model could not take this request's input: {event.error}",
                param="messages",
                code="invalid_model_input",
            )
        raise server_failure(event.error)
    if event.reason == "cancelled":
        raise ServiceUnavailable("The request was cancelled by the engine (shutting down).")
    return event


def usage_body(prompt_tokens: int, completion_tokens: int, image_tokens: int = 0) -> dict[str, Any]:
    """`prompt_tokens` includes `image_tokens` (also reported on their own)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": image_tokens},
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
