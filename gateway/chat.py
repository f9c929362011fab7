"""Serving chat completions: intake (parse, route, count), the guards' checks, and the
non-streamed answer (the streamed one is `gateway.sse`)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from gateway.errors import (
    ContentFiltered,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
    as_gateway_error,
    server_failure,
)
from gateway.guard_services import GuardServices, policy_header
from gateway.image_tokens import ImageTokenCounter
from gateway.images import ImageLoader
from gateway.metrics import GatewayMetrics
from gateway.model_router import ModelRouter
from gateway.prepared_chat import PreparedChat
from gateway.protocol import ChatCompletionRequest, ChatMessage, ImageContentPart
from gateway.settings import Settings
from gateway.token_ledger import TokenLedger
from gateway.tool_calls import answer_message, tools_json
from gateway.wire_shapes import ChatCompletion, Choice
from guards.base import GuardInput
from guards.decision import Decision
from guards.pipeline import log_decision
from model.engine import (
    ChatTurn,
    Engine,
    EngineRequest,
    Finished,
    ImagePart,
    TextDelta,
    TextPart,
    TokenLogprob,
    ToolCall,
)
from model.logprobs import openai_logprobs

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class Outcome:
    """One finished choice, non-streamed."""

    text: str
    finished: Finished
    logprobs: list[TokenLogprob]
    calls: str  # an upstream's tool calls, as call text ("" for local engines)


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
        tools = tools_json(request)
        probe = EngineRequest("probe", turns, request.sampling_params(1), tools_json=tools)
        if engine.cheap_token_count:
            prompt_tokens = engine.count_prompt_tokens(probe)
        else:  # tokenizing a long prompt must not block the event loop
            prompt_tokens = await asyncio.to_thread(engine.count_prompt_tokens, probe)
        # The context check is on the text sequence: images go to cross-attention.
        max_tokens = self._max_tokens(request, prompt_tokens, engine.info.context_length)
        image_tokens = self.image_tokens(engine, probe.images)
        completion_id = f"chat-{secrets.token_hex(16)}"
        passthrough = request.passthrough_json()
        engine_requests = [
            EngineRequest(
                f"{completion_id}-{i}",
                turns,
                request.sampling_params(max_tokens, i),
                stream=bool(request.stream),
                tools_json=tools,
                passthrough_json=passthrough,
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
            tokens=TokenLedger.admitted(
                text_tokens=prompt_tokens,
                images=len(probe.images),
                image_tokens=image_tokens,
                choices=len(engine_requests),
                max_tokens=max_tokens,
                counts_placeholders=engine.info.image_placeholder_usage,
            ),
            started=started,
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
            if message.content is None:  # an assistant message with tool calls only
                parts: tuple[TextPart | ImagePart, ...] = (TextPart(""),)
            elif isinstance(message.content, str):
                parts = (TextPart(message.content),)
            else:
                parts = tuple(
                    ImagePart(next(loaded)) if isinstance(p, ImageContentPart) else TextPart(p.text)
                    for p in message.content
                )
            calls = tuple(
                ToolCall(c.id, c.function.name, c.function.arguments)
                for c in message.tool_calls or []
            )
            turns.append(ChatTurn(role, parts, calls, message.tool_call_id))
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

    def audit_output(self, chat: PreparedChat, decision: Decision, text: str) -> None:
        """For a streamed choice: audit one output decision with the text it judged."""
        self._guards.audit_decision(decision, chat.policy, chat.audit_context, text)

    # -- non-streaming ---------------------------------------------------------------------
    async def complete(self, chat: PreparedChat) -> ChatCompletion:
        requests = chat.engine_requests
        try:
            if len(requests) == 1:  # the usual n=1: no task for gather to wrap it in
                outcomes = [await self._collect(chat, requests[0])]
            else:
                outcomes = await _all_or_nothing([self._collect(chat, r) for r in requests])
        except Exception as exc:
            raise as_gateway_error(exc) from exc
        # The guards judge the whole answer: its text and the calls it makes.
        decisions = await self.check_output(chat, [o.text + o.calls for o in outcomes])
        tokens = chat.tokens
        choices: list[Choice] = []
        for index, (outcome, decision) in enumerate(zip(outcomes, decisions, strict=True)):
            tokens.finish(index, outcome.finished)
            choices.append(_choice(chat.request, index, outcome, decision))
        self.count_tokens(tokens)
        return {
            "id": chat.completion_id,
            "object": "chat.completion",
            "created": chat.created,
            "model": chat.model_id,
            "choices": choices,
            "prompt_filter_results": chat.prompt_filter_results(),
            "usage": tokens.usage(),
            "system_fingerprint": self.system_fingerprint,
        }

    async def _collect(self, chat: PreparedChat, request: EngineRequest) -> Outcome:
        pieces: list[str] = []
        calls: list[str] = []
        logprobs: list[TokenLogprob] = []
        first = True
        events = chat.engine.generate(request)
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    if first:
                        self.observe_first_token(chat)
                        first = False
                    (calls if event.tool_calls else pieces).append(event.text)
                    logprobs += event.logprobs
                else:
                    return Outcome("".join(pieces), checked_finish(event), logprobs, "".join(calls))
        finally:
            # Closed here, at once: a generator left to the garbage collector is closed later
            # by the loop's finalizer hook, with a thread-safe wake-up and a task of its own.
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()
        raise server_failure("the engine ended the stream without a finish event")

    def observe_first_token(self, chat: PreparedChat) -> None:
        self._metrics.time_to_first_token.observe(time.perf_counter() - chat.started)

    def count_tokens(self, tokens: TokenLedger) -> None:
        self._metrics.tokens_in.inc(tokens.prompt)
        self._metrics.tokens_out.inc(tokens.completion)


def _choice(
    request: ChatCompletionRequest, index: int, outcome: Outcome, decision: Decision
) -> Choice:
    # A withheld completion: finish_reason content_filter, and none of its text (nor of its
    # logprobs, which spell the same text, nor a tool call, whose arguments the guards judged
    # as that text).
    message, reason = answer_message(request, outcome.text, outcome.finished.reason, outcome.calls)
    if decision.blocked:
        message, reason = {"role": "assistant", "content": ""}, "content_filter"
    return {
        "index": index,
        "message": message,
        "logprobs": (
            openai_logprobs(outcome.logprobs)
            if request.logprobs and reason in ("stop", "length")
            else None
        ),
        "finish_reason": reason,
        "content_filter_results": decision.content_filter_results(),
    }


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


def _context_error(context: int, prompt_tokens: int, asked: int) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
        "completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )
