"""Incremental detokenizing with stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding them alone gives
U+FFFD. We decode a small window of recent tokens and release text only up to the last complete
character, so a stream never splits a multi-byte character. Stop strings are matched on the
decoded text; anything that could still become a stop string is held back, and the stop string
itself is never released.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from model.engine import Fault, Finished, FinishReason, TextDelta, TokenLogprob

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings."""

    def __init__(self, decoder: Decoder, stop: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._tokens: list[int] = []
        # Text of tokens[:_read_offset] is final; tokens[_prefix_offset:_read_offset] are kept
        # as left context so that decoding a window gives the same spacing as decoding it all.
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # all decoded, complete text so far
        self._released = 0  # how much of _text has been handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[: self._released]

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that may be released now."""
        if self.stopped:
            return ""
        self._tokens.append(token_id)
        prefix = self._decoder.decode(
            self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full = self._decoder.decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
        if full.endswith(REPLACEMENT_CHAR) or len(full) <= len(prefix):
            # An incomplete character (or nothing new yet): wait for more tokens.
            return self._release(final=False)
        self._text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: release whatever is held back (no stop string matched)."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._tokens):
            # Tokens still waiting for the rest of a character that will never come: release
            # them as decoded (with U+FFFD), as decoding the whole output would.
            prefix = self._decoder.decode(
                self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True
            )
            full = self._decoder.decode(
                self._tokens[self._prefix_offset :], skip_special_tokens=True
            )
            self._text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._tokens)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        start = self._released
        if self._stop:
            # Search only where a new match can begin: from the last released position minus
            # the longest stop string.
            search_from = max(0, start - self._max_stop + 1)
            hits = [i for s in self._stop if (i := self._text.find(s, search_from)) != -1]
            if hits:
                cut = min(hits)
                self._text = self._text[:cut]
                self.stopped = True
                out = self._text[start:cut] if cut > start else ""
                self._released = max(start, cut)
                return out
            if not final:
                end = len(self._text) - self._held_back()
                end = max(end, start)
                self._released = end
                return self._text[start:end]
        self._released = len(self._text)
        return self._text[start:]

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class StreamedSequence(Protocol):
    """What `finish_stream` needs of an engine's per-request state."""

    done: bool
    finish_reason: Any

    @property
    def detok(self) -> IncrementalDetokenizer: ...
    @property
    def emit(self) -> Callable[[Any], None]: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...


def finish_stream(
    seq: StreamedSequence,
    reason: FinishReason,
    error: str | None = None,
    fault: Fault = "server",
    logprobs: tuple[TokenLogprob, ...] = (),
) -> None:
    """End a request's stream once: release held text (unless it stopped or failed), then one
    `Finished` event with the exact token counts. `logprobs`: those of the tokens whose text
    was still held back (they go with the released tail)."""
    if seq.done:
        return
    seq.done = True
    seq.finish_reason = reason
    if reason in ("stop", "length"):
        tail = seq.detok.flush()
        if tail:
            seq.emit(TextDelta(tail, logprobs))
    seq.emit(Finished(reason, seq.prompt_tokens, seq.completion_tokens, error, fault))
