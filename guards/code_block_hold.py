"""Streaming with Code Shield: a fenced code block is held back whole until it closes.

Code Shield judges code, and code judged line by line is judged wrong (`cursor.execute(` is
harmless until the string concatenated into it arrives). So while a fence is open, the stream
moderator neither checks nor releases anything from the fence's opening line on: text before
the block keeps flowing, the block goes out only after the check that sees it closed (or is
withheld with the stream ending in `content_filter`), and text after it flows again.

A block longer than the policy's `streaming.code_block_window_chars` would hold the client too
long: once the held part reaches the window, it is checked as it is (Code Shield scans an
unclosed block up to the end of the text) and released if clean; the hold then restarts from
there. The trade-off: a larger window means longer silences on long code, but fewer scans of
partial code (a pattern split across two window-sized pieces is judged on what each check has
seen: the whole answer so far, so the second check sees both halves, but the first half was
already sent).

`CodeBlockHold` scans each line once, when it ends, so each call costs the new text only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FENCE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")
# The start of an unfinished last line that could still become a fence: held until its newline
# arrives.
_MAYBE_FENCE_START = re.compile(r"[ \t]{0,3}[`~]")
_MAYBE_FENCE_HEAD = 4  # characters of a line that `_MAYBE_FENCE_START` may need


@dataclass
class HoldPlan:
    """What the moderator may do now: check `text` (the answer so far, minus a held open
    block), then release at most `release_limit` characters of its held text."""

    text: str
    release_limit: int


@dataclass
class CodeBlockHold:
    window: int = 4000
    _seen: int = 0  # characters of the answer scanned so far
    _line_at: int = 0  # offset of the current (unfinished) line
    _line: list[str] = field(default_factory=list, repr=False)  # its parts so far
    _head: str = ""  # its first characters (up to `_MAYBE_FENCE_HEAD`)
    _open_at: int | None = None  # offset of the open fence's line, if a fence is open
    _open_fence: str = ""
    _restart: int | None = field(default=None, repr=False)  # hold restarted after a window

    def _scan(self, new: str) -> None:
        """Take in the next characters of the answer: each line is judged once, when its
        newline arrives."""
        start = 0
        while (newline := new.find("\n", start)) >= 0:
            self._line.append(new[start:newline])
            line = "".join(self._line)
            self._end_of_line(line)
            self._line_at += len(line) + 1
            self._line.clear()
            self._head = ""
            start = newline + 1
        if start < len(new):
            rest = new[start:]
            self._line.append(rest)
            if len(self._head) < _MAYBE_FENCE_HEAD:
                self._head = (self._head + rest)[:_MAYBE_FENCE_HEAD]
        self._seen += len(new)

    def _end_of_line(self, line: str) -> None:
        match = _FENCE.match(line)
        if match is None:
            return
        fence = match.group(1)
        if self._open_at is None:
            self._open_at, self._open_fence = self._line_at, fence
        elif (
            fence[0] == self._open_fence[0]
            and len(fence) >= len(self._open_fence)
            and not line[match.end() :].strip()
        ):
            self._open_at, self._open_fence, self._restart = None, "", None

    def release_limit(self, released_chars: int, held: str) -> int:
        """How many characters of `held` (the answer's text after its first `released_chars`)
        may be checked and released now. Only the text that arrived since the last call is
        scanned: each call costs the new text only."""
        total = released_chars + len(held)
        if total > self._seen:
            self._scan(held[len(held) - (total - self._seen) :])
        hold_from = total
        if self._open_at is not None:
            hold_from = max(self._open_at, self._restart or 0, released_chars)
            if total - hold_from >= self.window:
                # Past the window: check what is held as it is; release it if clean.
                self._restart = total
                return len(held)
        elif self._line and _MAYBE_FENCE_START.match(self._head):
            hold_from = max(self._line_at, released_chars)  # a last line that may open a fence
        return max(0, hold_from - released_chars)

    def plan(self, released: str, held: str, *, final: bool = False) -> HoldPlan:
        text = released + held
        if final:
            return HoldPlan(text, len(held))
        limit = self.release_limit(len(released), held)
        return HoldPlan(text[: len(released) + limit], limit)
