"""Server-sent events for a chat completion, with output moderation per choice.

Every choice streams through its own `StreamModerator`: text is sent only after the policy's
output guards passed it (held back at most the policy's window; a policy with no output guard
holds nothing back), a violation stops that
choice's generation and ends it with `finish_reason: "content_filter"`, and what was withheld
is never sent. Every chunk carries `content_filter_results`; `prompt_filter_results` rides on
the first chunk; the usage chunk (only with `stream_options.include_usage`) is the one chunk
with empty `choices`, right before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from gateway.audit import should_audit
from gateway.chat import ChatService, PreparedChat, checked_finish, usage_body
from gateway.errors import GatewayError, as_gateway_error
from gateway.logprob_stream import HeldLogprobs
from gateway.tool_stream import ToolCallStream
from guards.base import GuardInput
from guards.code_block_hold import CodeBlockHold
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.stream_context import stream_context_chars
from guards.stream_moderator import ModerationStep, StreamModerator
from model.engine import EngineEvent, TextDelta
from model.logprobs import openai_logprobs
from model.openai_wire import json_bytes

log = structlog.get_logger(__name__)

MODERATED_FLUSH_S = 0.005


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else json_bytes(payload)
    return b"data: " + data + b"\n\n"


class ChoiceStream:
    """The state of one streamed choice."""

    def __init__(
        self,
        chat: PreparedChat,
        index: int,
        safe: dict[str, Any],
        audit: Callable[[Decision, str], None] | None = None,
    ) -> None:
        self.index = index
        self.results = safe  # the results of the last check (safe until the first one)
        self.deltas = 0
        self.open = True
        # The last audited (hits, failed guards): a failure's message may vary between checks.
        audited: list[tuple[dict[str, str], frozenset[str]]] = []
        self.logprobs = HeldLogprobs()
        self.tools = ToolCallStream(chat.request)

        async def judge(text: str, *, piece: bool) -> Decision:
            item = GuardInput("output", chat.turns, completion=text)
            (decision,) = await chat.pipeline.run("output", [item], piece=piece)
            # A stream is checked piece by piece, then whole at the end: audit each distinct
            # outcome once, not at every check (the non-streamed path's rule: blocked,
            # annotated or a guard failed).
            seen = (dict(decision.hits), frozenset(decision.errors))
            if (
                audit is not None
                and should_audit(decision)
                and (decision.blocked or audited[-1:] != [seen])
            ):
                audited[:] = [seen]
                audit(decision, text)
            return decision

        async def check(text: str) -> Decision:
            return await judge(text, piece=False)

        async def check_piece(text: str) -> Decision:
            return await judge(text, piece=True)

        self.moderator: StreamModerator[Decision] = StreamModerator(
            check=check,
            check_piece=check_piece,
            is_blocked=lambda decision: decision.blocked,
            window=chat.policy.streaming.window_chars,
            context=stream_context_chars(chat.policy, chat.pipeline.guards_for("output")),
            code_hold=code_block_hold(chat),
        )


class ChatStream:
    """One request's SSE stream: `await start()`, then iterate `chunks()`; always `aclose()`.

    `start` waits for the first engine event of every choice, so that an engine that fails
    before its first token (upstream 5xx, timeout, refused, overload) raises a `GatewayError`
    that the route sends as a real HTTP error. Text is not delayed: the first event is usually
    the first token, and it is streamed as soon as the response starts.
    """

    def __init__(self, service: ChatService, chat: PreparedChat) -> None:
        self._service = service
        self._chat = chat
        self._queue: asyncio.Queue[tuple[int, EngineEvent | BaseException]] = asyncio.Queue()
        engine = chat.engine
        self._tasks = [
            asyncio.create_task(_pump(i, engine.generate(r), self._queue.put))
            for i, r in enumerate(chat.engine_requests)
        ]
        self._early: deque[tuple[int, EngineEvent | BaseException]] = deque()

    async def start(self) -> None:
        """Wait for each choice's first event; raise its error if it failed before it."""
        waiting = set(range(len(self._tasks)))
        while waiting:
            index, event = await self._queue.get()
            if index in waiting:
                waiting.discard(index)
                if isinstance(event, BaseException):
                    raise as_gateway_error(event)
                if not isinstance(event, TextDelta):
                    checked_finish(event)  # an engine error or cancellation raises here
            self._early.append((index, event))

    async def _next(self) -> tuple[int, EngineEvent | BaseException]:
        if self._early:
            return self._early.popleft()
        return await self._queue.get()

    async def aclose(self) -> None:
        """Stop generating (a no-op once every choice has finished)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """SSE bytes per the contract; closing this iterator does not stop generation:
        `aclose` does."""
        service, chat, tasks = self._service, self._chat, self._tasks
        safe = _safe_results(chat)
        choices = [
            ChoiceStream(chat, i, safe, audit=service.stream_auditor(chat))
            for i in range(len(tasks))
        ]
        include_usage = chat.request.wants_usage_chunk
        # No output guard at all: nothing to hold text back for, it is sent as it comes.
        moderated = bool(chat.pipeline.guards_for("output"))
        first_text = True
        completion_tokens = 0
        prompt_tokens = chat.prompt_tokens

        def chunk(
            choice: ChoiceStream,
            delta: dict[str, Any],
            finish: str | None,
            logprobs: dict[str, Any] | None = None,
        ) -> bytes:
            body: dict[str, Any] = {
                "id": chat.completion_id,
                "object": "chat.completion.chunk",
                "created": chat.created,
                "model": chat.model_id,
                "system_fingerprint": service.system_fingerprint,
                "choices": [
                    {
                        "index": choice.index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                        "content_filter_results": choice.results,
                    }
                ],
            }
            if choice.index == 0 and delta.get("role"):
                body["prompt_filter_results"] = chat.prompt_filter_results()
            if include_usage:
                body["usage"] = None  # as OpenAI does on every chunk but the last
            return sse(body)

        def close(choice: ChoiceStream) -> None:
            choice.open = False
            tasks[choice.index].cancel()  # stop generating what will never be sent

        # Chunks ready together leave in one write: they are collected in `out` and yielded
        # just before the stream may wait (for the engine, or for a guard when moderated), and
        # at the end. A real engine's tokens come one at a time, each sent at once; a burst
        # (the role chunk and the first text; finish, usage and [DONE]) costs one write. While
        # a fast engine keeps text coming, moderated releases made within MODERATED_FLUSH_S of
        # the last write share the next one (a write costs more than a cheap guard's check).
        out: list[bytes] = []
        flushed_at = float("-inf")
        try:
            for choice in choices:
                out.append(chunk(choice, {"role": "assistant", "content": ""}, None))
            while any(c.open for c in choices):
                if out and (
                    (not self._early and self._queue.empty())
                    or (moderated and time.monotonic() - flushed_at >= MODERATED_FLUSH_S)
                ):
                    yield b"".join(out)
                    out.clear()
                    flushed_at = time.monotonic()
                index, event = await self._next()
                choice = choices[index]
                if not choice.open:
                    continue  # events already queued before the choice was closed
                if isinstance(event, BaseException):
                    raise as_gateway_error(event)
                if isinstance(event, TextDelta):
                    choice.deltas += 1
                    chat.completion_tokens += 1
                    choice.logprobs.add(event.text, event.logprobs)
                    choice.tools.produced(event.text, event.tool_calls)
                    if moderated:
                        step = await choice.moderator.feed(event.text)
                    else:
                        step = ModerationStep(release=event.text)
                else:
                    finished = checked_finish(event)
                    prompt_tokens = chat.with_images(finished.prompt_tokens)
                    completion_tokens += finished.completion_tokens
                    chat.completion_tokens += finished.completion_tokens - choice.deltas
                    step = await choice.moderator.finish() if moderated else _NOTHING
                if step.result is not None:
                    choice.results = step.result.content_filter_results()
                text = choice.tools.feed(step.release) if step.release else ""
                if text:
                    if first_text:
                        service.observe_first_token(chat)
                        first_text = False
                    released = choice.logprobs.release(len(text))
                    logprobs = openai_logprobs(released) if chat.request.logprobs else None
                    out.append(chunk(choice, {"content": text}, None, logprobs))
                if step.blocked:
                    close(choice)
                    if isinstance(event, TextDelta):
                        completion_tokens += choice.deltas
                    log.info("completion_withheld", choice=index, policy=chat.policy.name)
                    out.append(chunk(choice, {}, "content_filter"))
                elif not isinstance(event, TextDelta):
                    choice.open = False
                    reason: str = finished.reason
                    tail, call_deltas = choice.tools.finish(reason)
                    if tail:
                        released = choice.logprobs.release(len(tail))
                        logprobs = openai_logprobs(released) if chat.request.logprobs else None
                        out.append(chunk(choice, {"content": tail}, None, logprobs))
                    for delta in call_deltas:
                        out.append(chunk(choice, delta, None))
                    if call_deltas:
                        reason = "tool_calls"
                    out.append(chunk(choice, {}, reason))
            service.count_tokens(prompt_tokens, completion_tokens)
            if include_usage:
                out.append(
                    sse(
                        {
                            "id": chat.completion_id,
                            "object": "chat.completion.chunk",
                            "created": chat.created,
                            "model": chat.model_id,
                            "system_fingerprint": service.system_fingerprint,
                            "choices": [],
                            "usage": usage_body(
                                prompt_tokens, completion_tokens, chat.image_tokens
                            ),
                        }
                    )
                )
            out.append(sse("[DONE]"))
            yield b"".join(out)
        except GatewayError as exc:
            log.error("stream_failed", error=exc.message)
            # What passed moderation before the failure is still sent, then the error.
            out += (sse(exc.envelope()), sse("[DONE]"))
            yield b"".join(out)


_NOTHING: ModerationStep[Decision] = ModerationStep()


def code_block_hold(chat: PreparedChat) -> CodeBlockHold | None:
    """A code-block hold when Code Shield judges this stream's output (guards.code_block_hold)."""
    if "code_shield" not in chat.pipeline.guards_for("output"):
        return None
    return CodeBlockHold(window=chat.policy.streaming.code_block_window_chars)


def _safe_results(chat: PreparedChat) -> dict[str, Any]:
    """The output results of a check that found nothing, for chunks sent before the first
    check: the same for every request of a pipeline, so computed once per pipeline."""
    pipeline = chat.pipeline
    cached = _SAFE_OUTPUT.get(pipeline)
    if cached is None:
        cached = pipeline.safe_decision("output").content_filter_results()
        _SAFE_OUTPUT[pipeline] = cached
    return cached


# Per pipeline object (a reloaded policy gets a new pipeline; old ones drop out with it).
_SAFE_OUTPUT: weakref.WeakKeyDictionary[GuardPipeline, dict[str, Any]] = weakref.WeakKeyDictionary()


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
