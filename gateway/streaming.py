"""Server-sent events for a chat completion, with output moderation per choice.

Every choice streams through its own `StreamModerator`: text is sent only after the policy's
output guards passed it (held back at most the policy's window), a violation stops that
choice's generation and ends it with `finish_reason: "content_filter"`, and what was withheld
is never sent. Every chunk carries `content_filter_results`; `prompt_filter_results` rides on
the first chunk; the usage chunk (only with `stream_options.include_usage`) is the one chunk
with empty `choices`, right before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from gateway.chat import ChatService, PreparedChat, checked_finish, engine_failure, usage_body
from gateway.errors import GatewayError
from guards.base import GuardInput
from guards.decision import Decision
from guards.streaming import StreamModerator
from model.engine import EngineEvent, TextDelta

log = structlog.get_logger(__name__)


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class ChoiceStream:
    """The state of one streamed choice."""

    def __init__(self, chat: PreparedChat, index: int, safe: dict[str, Any]) -> None:
        self.index = index
        self.results = safe  # the results of the last check (safe until the first one)
        self.deltas = 0
        self.open = True

        async def check(text: str) -> Decision:
            item = GuardInput("output", chat.turns, completion=text)
            (decision,) = await chat.pipeline.run("output", [item])
            return decision

        self.moderator: StreamModerator[Decision] = StreamModerator(
            check=check,
            is_blocked=lambda decision: decision.blocked,
            window=chat.policy.streaming.window_chars,
        )


async def stream_chat(service: ChatService, chat: PreparedChat) -> AsyncIterator[bytes]:
    """SSE bytes per the contract; closing this iterator cancels generation."""
    queue: asyncio.Queue[tuple[int, EngineEvent | BaseException]] = asyncio.Queue()
    engine = chat.engine
    tasks = [
        asyncio.create_task(_pump(i, engine.generate(r), queue.put))
        for i, r in enumerate(chat.engine_requests)
    ]
    safe = chat.pipeline.safe_decision("output").content_filter_results()
    choices = [ChoiceStream(chat, i, safe) for i in range(len(tasks))]
    include_usage = chat.request.wants_usage_chunk
    first_text = True
    completion_tokens = 0
    prompt_tokens = chat.prompt_tokens

    def chunk(choice: ChoiceStream, delta: dict[str, Any], finish: str | None) -> bytes:
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
                    "logprobs": None,
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

    try:
        for choice in choices:
            yield chunk(choice, {"role": "assistant", "content": ""}, None)
        while any(c.open for c in choices):
            index, event = await queue.get()
            choice = choices[index]
            if not choice.open:
                continue  # events already queued before the choice was closed
            if isinstance(event, BaseException):
                raise engine_failure(event)
            if isinstance(event, TextDelta):
                choice.deltas += 1
                chat.completion_tokens += 1
                step = await choice.moderator.feed(event.text)
            else:
                finished = checked_finish(event)
                prompt_tokens = finished.prompt_tokens
                completion_tokens += finished.completion_tokens
                chat.completion_tokens += finished.completion_tokens - choice.deltas
                step = await choice.moderator.finish()
            if step.result is not None:
                choice.results = step.result.content_filter_results()
            if step.release:
                if first_text:
                    service.observe_first_token(chat)
                    first_text = False
                yield chunk(choice, {"content": step.release}, None)
            if step.blocked:
                close(choice)
                if isinstance(event, TextDelta):
                    completion_tokens += choice.deltas
                log.info("completion_withheld", choice=index, policy=chat.policy.name)
                yield chunk(choice, {}, "content_filter")
            elif not isinstance(event, TextDelta):
                choice.open = False
                yield chunk(choice, {}, finished.reason)
        service.count_tokens(prompt_tokens, completion_tokens)
        if include_usage:
            yield sse(
                {
                    "id": chat.completion_id,
                    "object": "chat.completion.chunk",
                    "created": chat.created,
                    "model": chat.model_id,
                    "system_fingerprint": service.system_fingerprint,
                    "choices": [],
                    "usage": usage_body(prompt_tokens, completion_tokens),
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
