"""Profanity: the packaged, trained classifier of `alt-profanity-check` plus a word list.

The classifier (a linear SVM over character and word n-grams, shipped inside the wheel: no
download) gives a probability per text; long texts are cut into sentences and lines and the
highest probability counts. A small built-in word list, matched through the blocklist machinery
(so `sh1t`, fullwidth letters, `f.u.c.k` and Cyrillic look-alikes count), catches what the
classifier misses on obfuscated spellings. The category's score is the higher of the two.

Category `profanity` (detected when score >= `detect_threshold`); details carry both scores and
the listed words that matched.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from guards.base import (
    CategoryScore,
    Guard,
    GuardInput,
    GuardVerdict,
    Stage,
    severity_from_score,
)
from guards.blocklist import CompiledBlocklist, NormalizedText

Classifier = Callable[[list[str]], Sequence[float]]

# Strong words score 0.95 (high), milder ones 0.6 (low): the policy's threshold decides.
STRONG_WORDS = (
    "fuck", "fucks", "fucked", "fucker", "fuckers", "fucking", "fuckin", "fuckhead", "fuckface",
    "motherfucker", "motherfuckers", "motherfucking", "shit", "shits", "shitty", "shithead",
    "bullshit", "horseshit", "asshole", "assholes", "arsehole", "bitch", "bitches", "bitchy",
    "cunt", "cunts", "dickhead", "dickheads", "wanker", "wankers", "twat", "twats", "slut",
    "sluts", "whore", "whores", "douchebag", "jackass", "dumbass", "dipshit", "cocksucker",
    "bastard", "bastards", "prick", "pricks",
)  # fmt: skip
MILD_WORDS = (
    "damn", "damned", "goddamn", "goddammit", "crap", "crappy", "piss", "pissed", "bollocks",
    "bugger", "arse", "wtf", "stfu",
)  # fmt: skip

# Texts up to this size are checked on the event loop (cheaper than a thread hop; bench/NOTES.md),
# longer ones in a thread.
INLINE_MAX_CHARS = 1024
_CHUNK_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_CHUNKS = 256


def builtin_wordlist() -> CompiledBlocklist:
    weights = {w: 0.95 for w in STRONG_WORDS} | {w: 0.6 for w in MILD_WORDS}
    return CompiledBlocklist(
        name="profanity_builtin", terms=STRONG_WORDS + MILD_WORDS, weights=weights
    )


def _load_classifier() -> Classifier:
    from profanity_check import predict_prob
    from profanity_check.profanity_check import model, vectorizer

    from guards.profanity_model import LinearProfanityModel

    fast = LinearProfanityModel.of(vectorizer, model)
    if fast is not None:
        return fast

    def classify(texts: list[str]) -> Sequence[float]:  # another shape: the package's own call
        return [float(p) for p in predict_prob(texts)]

    return classify


def chunks(text: str) -> list[str]:
    """Sentences and lines (the classifier's probability dilutes over long texts)."""
    parts = [p.strip() for p in _CHUNK_SPLIT.split(text) if p and p.strip()]
    if len(parts) > MAX_CHUNKS:
        # Merge the tail so that a huge text stays bounded in classifier calls.
        parts = [*parts[: MAX_CHUNKS - 1], " ".join(parts[MAX_CHUNKS - 1 :])]
    return parts


class ProfanityGuard(Guard):
    name = "profanity"
    stages: frozenset[Stage] = frozenset({"input", "output"})

    def __init__(
        self,
        *,
        classifier: Classifier | None = None,
        wordlist: CompiledBlocklist | None = None,
        detect_threshold: float = 0.5,
    ) -> None:
        self._classifier = classifier
        self._lock = threading.Lock()
        self.wordlist = wordlist if wordlist is not None else builtin_wordlist()
        self.detect_threshold = detect_threshold

    def load(self) -> None:
        """Import the classifier now (about a second, scikit-learn) rather than on first use."""
        with self._lock:
            if self._classifier is None:
                self._classifier = _load_classifier()

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        texts = [item.text_to_check() for item in items]
        if self._classifier is not None and sum(map(len, texts)) <= INLINE_MAX_CHARS:
            # A short prompt costs less than the hop to a thread and back.
            return self.check_texts(texts)
        # Loading the classifier, or a long text (the cost grows with the length): keep the
        # event loop free.
        return await asyncio.to_thread(self.check_texts, texts)

    def check_texts(self, texts: list[str]) -> list[GuardVerdict]:
        """One verdict per text under judgement (`GuardInput.text_to_check`)."""
        self.load()
        assert self._classifier is not None
        started = time.perf_counter()
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            for piece in chunks(text):
                pieces.append(piece)
                owners.append(i)
        probs = list(self._classifier(pieces)) if pieces else []
        model_scores = [0.0] * len(texts)
        for owner, prob in zip(owners, probs, strict=True):
            model_scores[owner] = max(model_scores[owner], prob)
        per_item = (time.perf_counter() - started) / max(1, len(texts))
        verdicts = []
        for text, model_score in zip(texts, model_scores, strict=True):
            item_started = time.perf_counter()
            matches = self.wordlist.find(NormalizedText.of(text)) if text else []
            word_score = self.wordlist.score(matches)
            score = max(model_score, word_score)
            details: dict[str, Any] = {
                "classifier_score": round(model_score, 4),
                "wordlist_score": word_score,
            }
            if matches:
                details["words"] = sorted({m.term for m in matches if m.term})
            verdicts.append(
                GuardVerdict(
                    guard=self.name,
                    categories={
                        "profanity": CategoryScore(
                            score=round(score, 4),
                            severity=severity_from_score(score),
                            detected=score >= self.detect_threshold,
                        )
                    },
                    latency_s=per_item + (time.perf_counter() - item_started),
                    details=details,
                )
            )
        return verdicts
