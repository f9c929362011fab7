"""Streamed logprobs follow the text that moderation releases, never ahead of it.

Output moderation holds text back and releases it in pieces of its own choosing; a token's
logprob entry (which spells the token's bytes) is sent only with the chunk that completes the
token's text, so text withheld by the policy is withheld from logprobs too.
"""

from __future__ import annotations

from collections import deque

from model.engine import TokenLogprob


class HeldLogprobs:
    """Logprob entries of one streamed choice, waiting for their text to be released."""

    def __init__(self) -> None:
        self._waiting: deque[tuple[int, tuple[TokenLogprob, ...]]] = deque()
        self._credit = 0  # released characters not yet matched to an engine delta

    def add(self, text: str, entries: tuple[TokenLogprob, ...]) -> None:
        """An engine delta: its text and the entries of the tokens that completed it."""
        self._waiting.append((len(text), entries))

    def release(self, chars: int) -> list[TokenLogprob]:
        """`chars` more characters were sent: the entries whose text is now wholly sent."""
        self._credit += chars
        out: list[TokenLogprob] = []
        while self._waiting and self._waiting[0][0] <= self._credit:
            length, entries = self._waiting.popleft()
            self._credit -= length
            out += entries
        return out
