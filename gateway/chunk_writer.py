"""A streamed answer's chunks as SSE bytes, and when they leave in one write.

Every chunk carries its choice's `content_filter_results`; `prompt_filter_results` rides on
the first chunk (choice 0's role); with `stream_options.include_usage` every chunk has
`usage: null` and a last chunk, the one with empty `choices`, has the usage, right before
`[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gateway.prepared_chat import PreparedChat
from gateway.token_ledger import TokenLedger
from gateway.wire_shapes import (
    ChatCompletionChunk,
    ContentFilterResults,
    Delta,
    Logprobs,
)
from model.openai_wire import json_bytes

# While a fast engine keeps text coming, moderated releases made within this many seconds of
# the last write share the next one (a write costs more than a cheap guard's check).
MODERATED_FLUSH_S = 0.005


def sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else json_bytes(payload)
    return b"data: " + data + b"\n\n"


class ChunkWriter:
    """Encodes one stream's chunks and holds them until they are written.

    Chunks ready together leave in one write: they are held here and taken just before the
    stream may wait (for the engine, or for a guard when moderated), and at the end. A real
    engine's tokens come one at a time, each sent at once; a burst (the role chunks and the
    first text; finish, usage and [DONE]) costs one write.
    """

    def __init__(self, chat: PreparedChat, system_fingerprint: str, moderated: bool) -> None:
        self._chat = chat
        self._system_fingerprint = system_fingerprint
        self._usage_field = chat.request.wants_usage_chunk
        self._moderated = moderated
        self._pending: list[bytes] = []
        self._written_at = float("-inf")

    # -- chunks ----------------------------------------------------------------------------
    def role(self, index: int, results: ContentFilterResults) -> None:
        """A choice's first chunk (choice 0's carries the prompt's filter results)."""
        body = self._body(index, {"role": "assistant", "content": ""}, None, results, None)
        if index == 0:
            body["prompt_filter_results"] = self._chat.prompt_filter_results()
        self._add(body)

    def content(
        self, index: int, text: str, logprobs: Logprobs | None, results: ContentFilterResults
    ) -> None:
        self._add(self._body(index, {"content": text}, None, results, logprobs))

    def delta(self, index: int, delta: Delta, results: ContentFilterResults) -> None:
        """A delta of its own, such as a piece of a tool call."""
        self._add(self._body(index, delta, None, results, None))

    def finish(self, index: int, reason: str, results: ContentFilterResults) -> None:
        self._add(self._body(index, {}, reason, results, None))

    def end(self, tokens: TokenLedger) -> None:
        """The usage chunk (when the request asked for it) and `[DONE]`."""
        if self._usage_field:
            chat = self._chat
            last: ChatCompletionChunk = {
                "id": chat.completion_id,
                "object": "chat.completion.chunk",
                "created": chat.created,
                "model": chat.model_id,
                "system_fingerprint": self._system_fingerprint,
                "choices": [],
                "usage": tokens.usage(),
            }
            self._pending.append(sse(last))
        self._pending.append(sse("[DONE]"))

    def error(self, envelope: Mapping[str, Any]) -> None:
        """A failure after the stream began: the error's envelope, then `[DONE]` (what passed
        moderation before it is still sent)."""
        self._pending += (sse(envelope), sse("[DONE]"))

    def _body(
        self,
        index: int,
        delta: Delta,
        finish: str | None,
        results: ContentFilterResults,
        logprobs: Logprobs | None,
    ) -> ChatCompletionChunk:
        chat = self._chat
        return {
            "id": chat.completion_id,
            "object": "chat.completion.chunk",
            "created": chat.created,
            "model": chat.model_id,
            "system_fingerprint": self._system_fingerprint,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "content_filter_results": results,
                }
            ],
        }

    def _add(self, body: ChatCompletionChunk) -> None:
        if self._usage_field:
            body["usage"] = None  # as OpenAI does on every chunk but the last
        self._pending.append(sse(body))

    # -- writes ----------------------------------------------------------------------------
    def due(self, events_waiting: bool) -> bool:
        """Whether the held chunks should be written before the stream waits again: when no
        engine event is waiting, or, moderated, when the last write is MODERATED_FLUSH_S old."""
        return bool(self._pending) and (
            not events_waiting
            or (self._moderated and time.monotonic() - self._written_at >= MODERATED_FLUSH_S)
        )

    def take(self) -> bytes:
        """The held chunks, as one write."""
        data = b"".join(self._pending)
        self._pending.clear()
        self._written_at = time.monotonic()
        return data
