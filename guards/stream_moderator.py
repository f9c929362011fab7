"""Streaming moderation: text reaches the client only after the output guards passed it.

The moderator holds generated text back until a natural boundary (end of a sentence or line)
after at least `step` new characters, or until the held text reaches the policy's window, then
checks it and releases what passed. A violation ends the stream; what was held back is never
sent.

Cost linear in the answer's length: a check during the stream does not see the whole answer so
far, only the text not checked yet after a bounded `context` of the text before it (released or
still held; `guards.stream_context`: compact, sized from the policy's longest blocklist match,
starting at a sentence start when one is near). So each character is checked a bounded number
of times (about three and a half with the default window), and the guards, model guards
included, run about once per half window of the answer. A term or regex match that starts in
released text and ends in the new text is still seen whole by the check that would release its
end; one that starts in held text is never half-sent (the tail, below).

At the end of generation the whole answer is checked once, as the non-streamed path checks it,
before the rest is released: a stream ends blocked whenever the same answer non-streamed would
be blocked. What may differ: an earlier check judged a piece with less context than the whole
answer (a classifier score, a regex match longer than the context bound), so a stream can be cut
that non-streamed would pass, or send a piece before the final check blocks the answer.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from guards.code_block_hold import CodeBlockHold
from guards.stream_context import SENTENCE_REACH_CHARS, compact

# Characters after which a check is natural: the end of a sentence, clause or line.
BOUNDARY_CHARS = frozenset(".!?;:\n。！？")

R = TypeVar("R")


@dataclass(frozen=True)
class ModerationStep(Generic[R]):
    """What the stream may do after a feed: send `release`, or stop when `blocked`.

    `result` is the result of the check this step ran (None when it ran none: the previous one
    still stands), or of the check that blocked."""

    release: str = ""
    blocked: bool = False
    result: R | None = None


_NOTHING_YET: ModerationStep[Any] = ModerationStep()


@dataclass
class StreamModerator(Generic[R]):
    """One per streamed choice.

    `check(text)` judges a text and returns a result; `is_blocked(result)` says whether it
    violates the policy. During the stream `text` is the text not checked yet after at least
    `context` compact characters of the text before it (default: half the window); at the end
    it is the whole answer. `window` bounds how many characters may be held back (a check is
    forced when the held text reaches it). After a passing check, the last `tail` characters
    (default: half the window) stay held even so: a term spread over several words, spaced-out
    letters or punctuation (`bad. phrase`, `f.o.r.b.i.d`) is judged whole by a later check
    before any of it is sent, as long as its span fits in the tail. `step` (default: what the
    tail leaves of the window) is the least new text before a check at a natural boundary.
    These four are read when the moderator is made.
    """

    check: Callable[[str], Awaitable[R]]
    is_blocked: Callable[[R], bool]
    window: int = 200
    # Judges a piece during the stream (default: `check`); `check` judges the whole answer.
    check_piece: Callable[[str], Awaitable[R]] | None = None
    tail: int | None = None
    context: int | None = None
    step: int | None = None
    held: str = ""
    last_result: R | None = None
    checks: int = 0
    checked_chars: int = 0  # characters given to `check`, all checks together
    released_chars: int = 0
    blocked: bool = False
    # Set when Code Shield runs on output: fenced code is held whole (guards.code_block_hold).
    code_hold: CodeBlockHold | None = None
    _boundary_chars: frozenset[str] = field(default=BOUNDARY_CHARS, repr=False)
    _released: list[str] = field(default_factory=list, repr=False)
    _context: str = field(default="", repr=False)  # the compact end of the released text
    _unchecked: int = field(default=0, repr=False)  # characters fed since the last check

    def __post_init__(self) -> None:
        chars = "".join(sorted(self._boundary_chars))
        self._boundary = re.compile(f"[{re.escape(chars)}]")
        self._window = max(1, self.window)
        self._tail = min(self._window - 1, self._window // 2 if self.tail is None else self.tail)
        self._tail = max(0, self._tail)
        self._step = max(1, self._window - self._tail if self.step is None else self.step)
        self._context_chars = max(0, self._window // 2 if self.context is None else self.context)

    @property
    def released(self) -> str:
        """Everything released so far."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    async def feed(self, text: str) -> ModerationStep[R]:
        """Add generated text; returns what may be released now (possibly nothing)."""
        if self.blocked:
            return ModerationStep(blocked=True, result=self.last_result)
        self.held += text
        self._unchecked += len(text)
        if not self._due():
            return _NOTHING_YET  # most deltas: one shared (frozen) step
        return await self._check_and_release()

    async def finish(self) -> ModerationStep[R]:
        """At the end of generation: check the whole answer, release whatever is still held."""
        if self.blocked:
            return ModerationStep(blocked=True, result=self.last_result)
        return await self._check_and_release(final=True)

    def _due(self) -> bool:
        held = len(self.held)
        if held >= self._window:
            return True
        if self._unchecked < self._step:
            return False
        # A boundary before the tail: a natural point to check and release up to.
        limit = held - self._tail
        return limit > 0 and self._boundary.search(self.held, 0, limit) is not None

    def _text_to_check(self, limit: int) -> str:
        """The held text not checked yet (up to `limit`), after the end of the text before it:
        at least `context` compact characters of it (released or still held), reaching back to
        the start of a sentence or line when one begins shortly before."""
        split = len(self.held) - self._unchecked
        before = compact(self._context + self.held[:split]) if split else self._context
        start = max(0, len(before) - self._context_chars)
        if start > 0 and self._context_chars:
            for i in range(start - 1, max(-1, start - 1 - SENTENCE_REACH_CHARS), -1):
                if before[i] in self._boundary_chars:
                    start = i + 1
                    break
        return before[start:] + self.held[split:limit]

    async def _check_and_release(self, *, final: bool = False) -> ModerationStep[R]:
        limit = len(self.held)  # how much of the held text this check may judge and release
        if self.code_hold is not None and not final:
            # An open fenced code block is neither checked nor released until it closes (or
            # outgrows its window): Code Shield judges a block whole (guards.code_block_hold).
            limit = self.code_hold.release_limit(self.released_chars, self.held)
        fresh = self._unchecked > len(self.held) - limit  # new text before any held block
        if final or fresh or self.last_result is None:
            if final:
                text = self.released + self.held
                result = await self.check(text)
            else:
                text = self._text_to_check(limit)
                result = await (self.check_piece or self.check)(text)
            self.checks += 1
            self.checked_chars += len(text)
        else:
            result = self.last_result  # nothing new to judge: the rest is a held code block
        # What lies beyond `limit` (a held block) stays unchecked for a later check.
        self._unchecked = 0 if final else len(self.held) - limit
        self.last_result = result
        if self.is_blocked(result):
            self.blocked = True
            self.held = ""
            return ModerationStep(blocked=True, result=result)
        # Release up to the last boundary or space before the tail: a word cut in half and the
        # tail stay held, so that a term split across two checks is never half-sent before the
        # check that sees it whole.
        if final:
            cut = len(self.held)
        elif limit < len(self.held):  # up to a held code block's fence line: judged whole
            cut = limit
        else:
            cut = self._release_point(self.held)
        out, self.held = self.held[:cut], self.held[cut:]
        if out:
            self._release(out)
        return ModerationStep(release=out, result=result)

    def _release(self, out: str) -> None:
        self._released.append(out)
        self.released_chars += len(out)
        keep = self._context_chars + SENTENCE_REACH_CHARS
        self._context = compact(self._context[-keep:] + out)[-keep:]

    def _release_point(self, text: str) -> int:
        limit = len(text) - self._tail
        # Never keep a window or more: an older cut point is passed over.
        lowest = max(0, len(text) - self._window + 1)
        for i in range(limit - 1, lowest - 1, -1):
            if text[i] in self._boundary_chars or text[i].isspace():
                return i + 1
        # No boundary before the tail within a full window: release up to the tail (the
        # window bounds the hold).
        return max(0, limit) if len(text) >= self._window else 0


def moderation_summary(moderator: StreamModerator[Any]) -> dict[str, Any]:
    """Numbers for logs and metrics (no text)."""
    return {
        "checks": moderator.checks,
        "checked_chars": moderator.checked_chars,
        "released_chars": moderator.released_chars,
        "blocked": moderator.blocked,
    }
