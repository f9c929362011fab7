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
        self.pending: list[bytes] = []  # encoded, not written yet
        self._written_at = float("-inf")

    # -- chunks ----------------------------------------------------------------------------
    def role(self, index: int, results: ContentFilterResults) -> None:
        """A choice's first chunk (choice 0's carries the prompt's filter results)."""
        self.chunk(index, {"role": "assistant", "content": ""}, None, results, first=index == 0)

    def chunk(
        self,
        index: int,
        delta: Delta,
        finish: str | None,
        results: ContentFilterResults,
        logprobs: Logprobs | None = None,
        *,
        first: bool = False,
    ) -> None:
        """One choice's chunk: a delta (content, a piece of a tool call, or `{}` with the
        finish reason)."""
        chat = self._chat
        body: ChatCompletionChunk = {
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
        if first:
            body["prompt_filter_results"] = chat.prompt_filter_results()
        if self._usage_field:
            body["usage"] = None  # as OpenAI does on every chunk but the last
        self.pending.append(sse(body))

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
            self.pending.append(sse(last))
        self.pending.append(sse("[DONE]"))

    def error(self, envelope: Mapping[str, Any]) -> None:
        """A failure after the stream began: the error's envelope, then `[DONE]` (what passed
        moderation before it is still sent)."""
        self.pending += (sse(envelope), sse("[DONE]"))

    # -- writes ----------------------------------------------------------------------------
    def interval_elapsed(self) -> bool:
        """Whether held chunks should be written although engine events are waiting: when
        moderated, and the last write is MODERATED_FLUSH_S old."""
        return self._moderated and time.monotonic() - self._written_at >= MODERATED_FLUSH_S

    def take(self) -> bytes:
        """The held chunks, as one write."""
        data = b"".join(self.pending)
        self.pending.clear()
        self._written_at = time.monotonic()
        return data
