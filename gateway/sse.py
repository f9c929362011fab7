"""Server-sent events for a chat completion: the engine's events, per choice, to SSE bytes.

One task per choice pumps its engine events into one queue; the stream hands each event to its
choice (`gateway.choice_stream`: output moderation, the tool-call hold, logprobs, the token
ledger), whose chunks the `ChunkWriter` encodes and writes in as few writes as it may. An error
after the response began ends the stream with the error's envelope, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import structlog

from gateway.chat import ChatService, checked_finish
from gateway.choice_stream import ChoiceStream
from gateway.chunk_writer import ChunkWriter
from gateway.errors import GatewayError, as_gateway_error
from gateway.prepared_chat import PreparedChat
from model.engine import EngineEvent, TextDelta

log = structlog.get_logger(__name__)


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
        service, chat = self._service, self._chat
        moderated = bool(chat.pipeline.guards_for("output"))
        writer = ChunkWriter(chat, service.system_fingerprint, moderated)
        choices = [
            ChoiceStream(chat, index, writer, task.cancel, service.audit_output)
            for index, task in enumerate(self._tasks)
        ]
        awaiting_first_text = True
        try:
            for choice in choices:
                choice.begin()
            while any(c.open for c in choices):
                # Write what is held before waiting: at once when no engine event is waiting.
                if writer.pending and (
                    (not self._early and self._queue.empty()) or writer.interval_elapsed()
                ):
                    yield writer.take()
                index, event = await self._next()
                choice = choices[index]
                if not choice.open:
                    continue  # events already queued before the choice was closed
                if isinstance(event, BaseException):
                    raise as_gateway_error(event)
                if await choice.take(event) and awaiting_first_text:
                    awaiting_first_text = False
                    service.observe_first_token(chat)
            service.count_tokens(chat.tokens)
            writer.end(chat.tokens)
            yield writer.take()
        except GatewayError as exc:
            log.error("stream_failed", error=exc.message)
            writer.error(exc.envelope())
            yield writer.take()


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
