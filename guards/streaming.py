"""Streaming moderation: text reaches the client only after the output guards passed it.

The moderator holds generated text back until a natural boundary (end of a sentence or line) or
until the held text reaches the policy's window, then checks the whole answer so far (so the
guards judge each piece with its context) and releases what passed. A violation ends the
stream; what was held back is never sent. At the end of generation everything still held is
checked once more before it is released.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from guards.code_block_hold import CodeBlockHold

# Characters after which a check is natural: the end of a sentence, clause or line.
BOUNDARY_CHARS = frozenset(".!?;:\n。！？")

R = TypeVar("R")


@dataclass
class ModerationStep(Generic[R]):
    """What the stream may do after a feed: send `release`, or stop when `blocked`."""

    release: str = ""
    blocked: bool = False
    result: R | None = None


@dataclass
class StreamModerator(Generic[R]):
    """One per streamed choice.

    `check(text)` judges the whole answer so far and returns a result; `is_blocked(result)`
    says whether it violates the policy. `window` bounds how many characters may be held back
    (a check is forced when the held text reaches it). After a passing check, the last `tail`
    characters (default: half the window) stay held even so: a term spread over several words,
    spaced-out letters or punctuation (`bad. phrase`, `f.o.r.b.i.d`) is judged whole by a
    later check before any of it is sent, as long as its span fits in the tail.
    """

    check: Callable[[str], Awaitable[R]]
    is_blocked: Callable[[R], bool]
    window: int = 200
    tail: int | None = None
    released: str = ""
    held: str = ""
    last_result: R | None = None
    checks: int = 0
    blocked: bool = False
    # Set when Code Shield runs on output: fenced code is held whole (guards.code_block_hold).
    code_hold: CodeBlockHold | None = None
    _checked: str | None = field(default=None, repr=False)
    _boundary_chars: frozenset[str] = field(default=BOUNDARY_CHARS, repr=False)

    async def feed(self, text: str) -> ModerationStep[R]:
        """Add generated text; returns what may be released now (possibly nothing)."""
        if self.blocked:
            return ModerationStep(blocked=True, result=self.last_result)
        self.held += text
        if not self._due():
            return ModerationStep(result=self.last_result)
        return await self._check_and_release()

    async def finish(self) -> ModerationStep[R]:
        """At the end of generation: check and release whatever is still held."""
        if self.blocked:
            return ModerationStep(blocked=True, result=self.last_result)
        if not self.held and self.last_result is not None:
            return ModerationStep(result=self.last_result)
        return await self._check_and_release(final=True)

    @property
    def _tail(self) -> int:
        window = max(1, self.window)
        return min(window - 1, self.window // 2 if self.tail is None else max(0, self.tail))

    def _due(self) -> bool:
        if len(self.held) >= max(1, self.window):
            return True
        # A boundary before the tail: a natural point to check and release up to.
        releasable = self.held[: len(self.held) - self._tail]
        return any(ch in self._boundary_chars for ch in releasable)

    async def _check_and_release(self, *, final: bool = False) -> ModerationStep[R]:
        candidate, limit = self.released + self.held, len(self.held)
        if self.code_hold is not None:  # an open code block is neither checked nor released
            plan = self.code_hold.plan(self.released, self.held, final=final)
            candidate, limit = plan.text, plan.release_limit
        if candidate == self._checked and self.last_result is not None:
            result = self.last_result  # nothing new to judge (the rest is a held code block)
        else:
            result = await self.check(candidate)
            self.checks += 1
            self._checked = candidate
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
        self.released += out
        return ModerationStep(release=out, result=result)

    def _release_point(self, text: str) -> int:
        limit = len(text) - self._tail
        for i in range(limit - 1, -1, -1):
            if text[i] in self._boundary_chars or text[i].isspace():
                return i + 1
        # No boundary before the tail within a full window: release up to the tail (the
        # window bounds the hold).
        return max(0, limit) if len(text) >= max(1, self.window) else 0


def moderation_summary(moderator: StreamModerator[Any]) -> dict[str, Any]:
    """Numbers for logs and metrics (no text)."""
    return {
        "checks": moderator.checks,
        "released_chars": len(moderator.released),
        "blocked": moderator.blocked,
    }
