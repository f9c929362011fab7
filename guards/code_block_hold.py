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

`CodeBlockHold` keeps its scan position, so each call costs the new text only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FENCE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")
# An unfinished last line that could still become a fence: held until its newline arrives.
_MAYBE_FENCE = re.compile(r"[ \t]{0,3}(`{1,}|~{1,})[^\n]*")


@dataclass
class HoldPlan:
    """What the moderator may do now: check `text` (the answer so far, minus a held open
    block), then release at most `release_limit` characters of its held text."""

    text: str
    release_limit: int


@dataclass
class CodeBlockHold:
    window: int = 4000
    _pos: int = 0  # text before this offset has been scanned for fence lines
    _open_at: int | None = None  # offset of the open fence's line, if a fence is open
    _open_fence: str = ""
    _restart: int | None = field(default=None, repr=False)  # hold restarted after a window

    def _scan(self, text: str) -> None:
        while True:
            newline = text.find("\n", self._pos)
            if newline < 0:
                return
            line = text[self._pos : newline]
            match = _FENCE.match(line)
            if match is not None:
                fence = match.group(1)
                if self._open_at is None:
                    self._open_at, self._open_fence = self._pos, fence
                elif (
                    fence[0] == self._open_fence[0]
                    and len(fence) >= len(self._open_fence)
                    and not line[match.end() :].strip()
                ):
                    self._open_at, self._open_fence, self._restart = None, "", None
            self._pos = newline + 1

    def plan(self, released: str, held: str, *, final: bool = False) -> HoldPlan:
        text = released + held
        if final:
            return HoldPlan(text, len(held))
        self._scan(text)
        hold_from = len(text)
        if self._open_at is not None:
            hold_from = max(self._open_at, self._restart or 0, len(released))
            if len(text) - hold_from >= self.window:
                # Past the window: check what is held as it is; release it if clean.
                self._restart = len(text)
                return HoldPlan(text, len(held))
        else:
            partial = _MAYBE_FENCE.fullmatch(text, self._pos)
            if partial is not None:  # a last line that may be an opening fence: hold it
                hold_from = max(self._pos, len(released))
        return HoldPlan(text[:hold_from], max(0, hold_from - len(released)))
