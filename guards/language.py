"""The model card's language policy: text in the supported languages, image requests in English.

Detection, cheapest first:

1. Code (fenced blocks, inline code), URLs and long unbroken tokens (base64) are removed: they
   are not natural language.
2. Letters are counted per writing system. A text whose dominant script covers less than
   `MIXED_SHARE` of its letters is *mixed*, one with fewer than the policy's `min_letters`
   letters is *short*: both are `unknown` and never flagged (a greeting, a name, a formula).
3. Scripts that name one language answer at once (Thai -> th, Devanagari -> hi, Hangul -> ko,
   kana -> ja, ...). Only Latin, Cyrillic and Arabic text goes to the statistical detector
   (`lingua-language-detector`, offline, its models inside the wheel), restricted to the
   languages of that script, so that a Swahili text is called Swahili, not the nearest of the
   eight supported ones.
4. Below the policy's `min_confidence` the answer is `unknown`: never flagged.

Category `unsupported_language` (detected when the language is known, confident and not in the
policy's allowed list: `language.text` for text-only conversations, `language.image` when the
conversation has an image); details carry the language, its confidence and the allowed list.
At input the last user message is judged, at output the completion.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guards.base import CategoryScore, Guard, GuardInput, GuardVerdict, Stage
from guards.language_codes import (
    CARD_IMAGE_LANGUAGES,
    CARD_TEXT_LANGUAGES,
    SCRIPT_LANGUAGES,
    describe,
)

if TYPE_CHECKING:
    from guards.policy import Policy

CATEGORY = "unsupported_language"
# The dominant script must cover this share of the letters, else the text is mixed.
MIXED_SHARE = 0.6
# Scripts are counted on the first MAX_CHARS characters; the statistical detector reads the
# first DETECT_CHARS of them (a few sentences settle the language; its cost grows with length).
MAX_CHARS = 1000
DETECT_CHARS = 200
# Texts up to this size are judged on the event loop (< 1 ms), longer ones in a thread.
INLINE_MAX_CHARS = 2000

# Not natural language: fenced and inline code, URLs, and long unbroken tokens (base64, hashes,
# identifiers), which lingua would otherwise read as some language.
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|https?://\S+|[A-Za-z0-9+/=_-]{24,}", re.DOTALL)
_SCRIPTS: dict[str, re.Pattern[str]] = {
    "latin": re.compile(r"[A-Za-z\u00C0-\u024F\u1E00-\u1EFF]"),
    "cyrillic": re.compile(r"[\u0400-\u04FF]"),
    "arabic": re.compile(r"[\u0600-\u06FF\u0750-\u077F\uFB50-\uFDFF\uFE70-\uFEFF]"),
    "devanagari": re.compile(r"[\u0900-\u097F]"),
    "thai": re.compile(r"[\u0E00-\u0E7F]"),
    "hangul": re.compile(r"[\uAC00-\uD7AF\u1100-\u11FF\u3130-\u318F]"),
    "kana": re.compile(r"[\u3040-\u30FF]"),
    "han": re.compile(r"[\u4E00-\u9FFF\u3400-\u4DBF]"),
    "greek": re.compile(r"[\u0370-\u03FF]"),
    "hebrew": re.compile(r"[\u0590-\u05FF]"),
    "armenian": re.compile(r"[\u0530-\u058F]"),
    "georgian": re.compile(r"[\u10A0-\u10FF]"),
    "bengali": re.compile(r"[\u0980-\u09FF]"),
    "gurmukhi": re.compile(r"[\u0A00-\u0A7F]"),
    "gujarati": re.compile(r"[\u0A80-\u0AFF]"),
    "tamil": re.compile(r"[\u0B80-\u0BFF]"),
    "telugu": re.compile(r"[\u0C00-\u0C7F]"),
}
_LETTER = re.compile(r"[^\W\d_]")
# Scripts whose text goes to the statistical detector (several languages share them).
_DETECTOR_SCRIPTS = ("latin", "cyrillic", "arabic")


@dataclass(frozen=True)
class Detection:
    """`language` is an ISO 639-1 code, or None (unknown: `reason` says why)."""

    language: str | None
    confidence: float
    reason: str  # "script", "detector", "short", "mixed", "low_confidence", "empty", "loading"
    script: str | None = None


# lingua detectors per (script, accurate), kept for the process: their models are read-only once
# loaded, and loading takes seconds, which every guard registry (each app, each `policy eval`)
# would otherwise pay again. Low-accuracy mode (trigrams only) loads in ~1.5 s and is as good as
# high accuracy from ~120 characters (lingua's own guidance; checked on bench/guard_eval); on
# short texts it flags plain English ("Write a haiku about harbours at dawn.") as another
# language, so short texts use high-accuracy mode, which loads in 5-45 s: in the background
# at start, short texts reading "unknown" (never flagged) until it is there.
_LINGUA: dict[tuple[str, bool], Any] = {}
_LINGUA_LOCK = threading.Lock()
LONG_TEXT_CHARS = 120


_BUILD_LOCKS: dict[tuple[str, bool], threading.Lock] = {}


def _lingua(script: str, accurate: bool) -> Any:
    key = (script, accurate)
    with _LINGUA_LOCK:
        found = _LINGUA.get(key)
        building = _BUILD_LOCKS.setdefault(key, threading.Lock())
    if found is not None:
        return found
    with building:  # one build per detector; other callers wait for it (readers do not)
        with _LINGUA_LOCK:
            found = _LINGUA.get(key)
        if found is not None:
            return found
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        isos = [getattr(IsoCode639_1, code.upper()) for code in SCRIPT_LANGUAGES[script]]
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*isos)
        if not accurate:
            builder = builder.with_low_accuracy_mode()
        built = builder.with_preloaded_language_models().build()
        with _LINGUA_LOCK:
            _LINGUA[key] = built
        return built


def _lingua_ready(script: str, accurate: bool) -> Any | None:
    with _LINGUA_LOCK:
        return _LINGUA.get((script, accurate))


_ACCURATE_LOADER: threading.Thread | None = None


def _load_accurate() -> None:
    for script in _DETECTOR_SCRIPTS:
        _lingua(script, True)


class LanguageDetector:
    """Script shortcuts plus lingua detectors (per shared script, shared process-wide)."""

    def load(self, *, wait: bool = True) -> None:
        """Build the detectors now rather than on a request (where loading would run past the
        guard's timeout). `wait=False` (the gateway): the fast ones now, the accurate ones for
        short texts in a background thread."""
        global _ACCURATE_LOADER
        for script in _DETECTOR_SCRIPTS:
            _lingua(script, False)
        if wait:
            _load_accurate()
            return
        with _LINGUA_LOCK:
            if _ACCURATE_LOADER is None:
                _ACCURATE_LOADER = threading.Thread(
                    target=_load_accurate, name="lingua-load", daemon=True
                )
                _ACCURATE_LOADER.start()

    def detect(
        self,
        text: str,
        *,
        min_letters: int,
        min_confidence: float,
        allowed: frozenset[str] = frozenset(),
    ) -> Detection:
        """The language of a text, or unknown. The confidence of a detector answer is that of
        its side of the decision: for a language outside `allowed`, the detector's summed
        confidence over every language outside it (Croatian and Bosnian split their
        confidence, but both are "not allowed"); for an allowed one, its own."""
        prose = _CODE.sub(" ", text)[:MAX_CHARS]
        script, top, letters = _dominant_script(prose)
        if letters == 0:
            return Detection(None, 0.0, "empty")
        share = min(1.0, top / letters)
        if share < MIXED_SHARE:
            return Detection(None, round(share, 4), "mixed", script)
        # A script that names its language needs fewer letters (a Han or Thai letter carries
        # more than a Latin one); statistical detection needs the full floor.
        floor = min_letters if script in _DETECTOR_SCRIPTS else max(4, min_letters // 3)
        if letters < floor:
            return Detection(None, round(share, 4), "short", script)
        if script not in _DETECTOR_SCRIPTS:
            return Detection(SCRIPT_LANGUAGES[script][0], round(share, 4), "script", script)
        sample = prose[:DETECT_CHARS]
        if len(sample.strip()) >= LONG_TEXT_CHARS:
            detector = _lingua(script, False)
        else:
            detector = _lingua_ready(script, True)
            if detector is None:  # still loading (the first seconds after start)
                return Detection(None, 0.0, "loading", script)
        values = detector.compute_language_confidence_values(sample)
        if not values:
            return Detection(None, 0.0, "low_confidence", script)
        codes = [(v.language.iso_code_639_1.name.lower(), float(v.value)) for v in values]
        code, value = codes[0]
        if code not in allowed:
            value = sum(v for c, v in codes if c not in allowed)
        confidence = round(value * share, 4)
        if confidence < min_confidence:
            return Detection(None, confidence, "low_confidence", script)
        return Detection(code, confidence, "detector", script)


def _dominant_script(prose: str) -> tuple[str, int, int]:
    """(script, its letters, all letters). Latin text (the common case) costs two regex
    passes; the other scripts are counted only when Latin is not the majority."""
    letters = len(_LETTER.findall(prose))
    latin = len(_SCRIPTS["latin"].findall(prose))
    if letters == 0 or latin / letters >= MIXED_SHARE:
        return "latin", latin, max(letters, latin)
    counts = {name: len(p.findall(prose)) for name, p in _SCRIPTS.items()}
    if counts["kana"]:  # Japanese mixes kana with Han characters
        counts["kana"] += counts.pop("han")
    script, top = max(counts.items(), key=lambda kv: kv[1])
    return script, top, max(letters, sum(counts.values()))


@dataclass(frozen=True)
class LanguageRules:
    text: tuple[str, ...] = CARD_TEXT_LANGUAGES
    image: tuple[str, ...] = CARD_IMAGE_LANGUAGES
    min_confidence: float = 0.6
    min_letters: int = 16


def _has_image(item: GuardInput) -> bool:
    from model.engine import ImagePart

    return any(isinstance(p, ImagePart) for turn in item.messages for p in turn.parts)


class LanguageGuard(Guard):
    name = "language"
    stages: frozenset[Stage] = frozenset({"input", "output"})
    # A piece of a streamed answer has no language worth judging apart from the answer: the
    # stream's final check judges it whole (and the guard's cost does not grow per piece).
    whole_answer_only = True

    def __init__(
        self, detector: LanguageDetector | None = None, rules: LanguageRules | None = None
    ) -> None:
        self.detector = detector if detector is not None else LanguageDetector()
        self.rules = rules if rules is not None else LanguageRules()

    def load(self, *, wait: bool = True) -> None:
        self.detector.load(wait=wait)

    def for_policy(self, policy: Policy) -> LanguageGuard:
        """The same detector under the policy's allowed languages and floors."""
        s = policy.language
        rules = LanguageRules(
            text=tuple(s.text),
            image=tuple(s.image),
            min_confidence=s.min_confidence,
            min_letters=s.min_letters,
        )
        return LanguageGuard(self.detector, rules)

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        if sum(len(_judged_text(item)) for item in items) <= INLINE_MAX_CHARS:
            return [self.check_one(item) for item in items]  # < 1 ms: no thread hop
        return await asyncio.to_thread(lambda: [self.check_one(item) for item in items])

    def check_one(self, item: GuardInput) -> GuardVerdict:
        started = time.perf_counter()
        rules = self.rules
        image = _has_image(item)
        allowed = rules.image if image else rules.text
        found = self.detector.detect(
            _judged_text(item),
            min_letters=rules.min_letters,
            min_confidence=rules.min_confidence,
            allowed=frozenset(allowed),
        )
        flagged = found.language is not None and found.language not in allowed
        details: dict[str, Any] = {
            "language": found.language or "unknown",
            "confidence": found.confidence,
            "basis": found.reason,
            "image_request": image,
        }
        if flagged:
            kind = "image requests" if image else "text"
            details["reason"] = (
                f"language {found.language} is not supported for {kind}; "
                f"supported: {describe(list(allowed))}"
            )
        severity = "safe"
        if flagged:
            severity = "high" if found.confidence >= 0.9 else "medium"
        verdict = GuardVerdict(
            guard=self.name,
            categories={
                CATEGORY: CategoryScore(
                    score=found.confidence if flagged else 0.0,
                    severity=severity,  # type: ignore[arg-type]
                    detected=flagged,
                )
            },
            details={CATEGORY: details},
        )
        verdict.latency_s = time.perf_counter() - started
        return verdict


def _judged_text(item: GuardInput) -> str:
    if item.stage == "output":
        return item.completion or ""
    return item.last_user_text()
