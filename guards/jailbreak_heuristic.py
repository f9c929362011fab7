"""A jailbreak / prompt-injection detector that needs no download: weighted patterns.

Each signal (`guards.jailbreak_signals`) belongs to a family of well-known attacks (instruction
override, DAN and "modes", "you are no longer bound", system-prompt extraction, role-play
overrides, encoded payloads, forged turn or role headers, fake authority). A family counts
once, with its strongest signal's weight; families combine as independent evidence:
`score = 1 - prod(1 - w)`. One strong signal (an explicit "ignore all previous instructions") is
enough for `high`; weak signals (a mention of "jailbreak", "stay in character", a long base64
blob) only count together.

Where the text comes from decides the category:
- the user's turns -> `jailbreak` (a direct attack by the client);
- system, assistant and tool turns -> `indirect_attack` (instructions planted in content the
  model treats as privileged or as its own: pasted transcripts, documents, forged history, and
  tool results such as fetched web pages).

The text is normalised like the blocklists (case, NFKC, confusables, zero-width characters),
and also matched with leetspeak undone inside words (`1gn0re` -> `ignore`). A signal found only
inside quotes counts for part of its weight (`QUOTED_FACTOR`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from guards.base import (
    CategoryScore,
    Guard,
    GuardInput,
    GuardVerdict,
    Stage,
    severity_from_score,
)
from guards.blocklist import normalize
from guards.jailbreak_signals import SIGNALS, Signal
from model.engine import TextPart

# Leetspeak undone only inside words (`1gn0re`, `pr3v10us`), for both readings of 1 (i and l).
_LEET_IN_WORD = re.compile(r"(?<=[a-z])[0134578@$]|[0134578@$](?=[a-z])")
_LEET_I = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s"}
_LEET_L = {**_LEET_I, "1": "l"}


def _variants(text: str) -> list[str]:
    basic = normalize(text)
    out = [basic]
    if _LEET_IN_WORD.search(basic):
        for table in (_LEET_I, _LEET_L):
            variant = _LEET_IN_WORD.sub(lambda m, t=table: t[m.group(0)], basic)  # type: ignore[misc]
            if variant not in out:
                out.append(variant)
    return out


@dataclass(frozen=True)
class HeuristicResult:
    score: float
    families: dict[str, float]

    @property
    def signals(self) -> list[str]:
        return sorted(self.families)


# Quoted spans: "...", “...”, ‘...’, and '...' when the quotes are not apostrophes.
_QUOTED = re.compile(
    r"\"[^\"\n]{1,400}\"|“[^”\n]{1,400}”|‘[^’\n]{1,400}’|(?<![a-z0-9])'[^'\n]{1,400}'(?![a-z0-9])"
)
# A signal found only inside quotes ("translate 'forget your rules'", "attacks like 'ignore
# previous instructions'") counts for this fraction of its weight: quoted text is more often
# discussed than obeyed. Prompt Guard, when configured, judges such cases better.
QUOTED_FACTOR = 0.5


def _quoted_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _QUOTED.finditer(text)]


def _signal_weight(signal: Signal, variants: Sequence[tuple[str, list[tuple[int, int]]]]) -> float:
    best = 0.0
    for text, quoted in variants:
        for match in signal.pattern.finditer(text):
            start, end = match.span()
            inside = any(qs <= start and end <= qe for qs, qe in quoted)
            if not inside:
                return signal.weight
            best = signal.weight * QUOTED_FACTOR
    return best


def score_text(text: str, signals: Iterable[Signal] = SIGNALS) -> HeuristicResult:
    """The jailbreak score of one text in [0, 1] and the families that fired."""
    if not text.strip():
        return HeuristicResult(0.0, {})
    variants = [(v, _quoted_spans(v)) for v in _variants(text)]
    families: dict[str, float] = {}
    for signal in signals:
        if signal.weight <= families.get(signal.family, 0.0):
            continue
        weight = _signal_weight(signal, variants)
        if weight > families.get(signal.family, 0.0):
            families[signal.family] = weight
    remaining = 1.0
    for weight in families.values():
        remaining *= 1.0 - weight
    return HeuristicResult(round(1.0 - remaining, 4), families)


def _texts(item: GuardInput, roles: tuple[str, ...]) -> list[str]:
    return [
        part.text
        for turn in item.messages
        if turn.role in roles
        for part in turn.parts
        if isinstance(part, TextPart)
    ]


def _combine(results: Sequence[HeuristicResult]) -> HeuristicResult:
    if not results:
        return HeuristicResult(0.0, {})
    best = max(results, key=lambda r: r.score)
    return best


ALL_ROLES = ("system", "user", "assistant", "tool")
# Content the user did not write: instructions planted there are indirect attacks. Tool results
# (`role: "tool"`) are third-party content by definition (web pages, files, API answers).
THIRD_PARTY_ROLES = ("system", "assistant", "tool")
# Up to this many characters per batch are scored on the event loop (well under a millisecond
# per kilobyte); longer batches go to a worker thread.
INLINE_MAX_CHARS = 8192


class JailbreakHeuristicGuard(Guard):
    """`jailbreak` from the user's turns, `indirect_attack` from system, assistant and tool
    turns."""

    name = "jailbreak_heuristic"
    stages: frozenset[Stage] = frozenset({"input"})

    def __init__(self, *, detect_threshold: float = 0.5) -> None:
        self.detect_threshold = detect_threshold

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        if sum(len(p) for item in items for p in _texts(item, ALL_ROLES)) > INLINE_MAX_CHARS:
            # Long texts take tens of milliseconds or more: keep the event loop free.
            return await asyncio.to_thread(lambda: [self.check_one(i) for i in items])
        return [self.check_one(item) for item in items]

    def _category(self, result: HeuristicResult) -> CategoryScore:
        return CategoryScore(
            score=result.score,
            severity=severity_from_score(result.score),
            detected=result.score >= self.detect_threshold,
        )

    def check_one(self, item: GuardInput) -> GuardVerdict:
        started = time.perf_counter()
        direct = _combine([score_text(t) for t in _texts(item, ("user",))])
        planted = _combine([score_text(t) for t in _texts(item, THIRD_PARTY_ROLES)])
        details = {
            "jailbreak": {"score": direct.score, "signals": direct.signals},
            "indirect_attack": {"score": planted.score, "signals": planted.signals},
        }
        return GuardVerdict(
            guard=self.name,
            categories={
                "jailbreak": self._category(direct),
                "indirect_attack": self._category(planted),
            },
            latency_s=time.perf_counter() - started,
            details=details,
        )
