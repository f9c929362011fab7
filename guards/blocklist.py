"""Custom blocklists: words, phrases and regular expressions, matched on normalised text.

Normalisation (shared with the jailbreak heuristic and the profanity word list) defeats the
cheap evasions: case, Unicode compatibility forms (NFKC: fullwidth, ligatures, mathematical
letters), diacritics, confusable letters from Cyrillic and Greek (and Latin small capitals),
zero-width and other invisible characters. Words and phrases are also matched after folding
common leetspeak (0->o, 1->i, l->i, 3->e, 4->a, 5->s, 7->t, @->a, $->s: `l` and `1` fold onto
`i` on both sides, so `he11o` matches `hello`) and after joining spaced-out letters
(`f u c k`, `f.u.c.k`).

- A *term* (word or phrase) matches on word boundaries; its words may be separated by up to four
  spaces or punctuation marks (`GATEWAY-CANARY-BLOCK` matches `gateway canary block`).
- A *regex* runs on the normalised text (lower case, without leetspeak folding), case
  insensitive, with the `regex` module and a per-search timeout. Patterns are validated when the
  policy loads: at most `MAX_REGEX_CHARS` characters, compiled, and refused when a quantified
  group contains a quantifier (`(a+)+`, the classic catastrophic backtracking shape).

The guard reports `blocklist:<name>` for each list that matched, with `details["matches"]`
listing `{"list", "term"}` (or `{"list", "regex"}`).
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import regex

from guards.base import CategoryScore, Guard, GuardInput, GuardVerdict, Stage

if TYPE_CHECKING:
    from guards.policy import Policy

MAX_TERM_CHARS = 200
MAX_REGEX_CHARS = 256
MAX_TERMS_PER_LIST = 10_000
REGEX_TIMEOUT_S = 0.05
# Up to this many characters per batch are checked on the event loop; more go to a thread.
INLINE_MAX_CHARS = 8192

# -- normalisation ---------------------------------------------------------------------------

_INVISIBLE_RANGES = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul fillers
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),  # Mongolian variation selectors, vowel separator
    (0x200B, 0x200F),  # zero-width space/joiners, LRM/RLM
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # BOM / zero-width no-break space
    (0xFFA0, 0xFFA0),
    (0xE0000, 0xE007F),  # tag characters
)
INVISIBLE_CHARS: dict[int, None] = {
    cp: None for lo, hi in _INVISIBLE_RANGES for cp in range(lo, hi + 1)
}

# Look-alike letters (after case folding and diacritic stripping) onto Latin.
_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
        "п": "n", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ь": "b", "і": "i",
        "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
        "ѵ": "v", "ү": "y", "ɡ": "g",
        # Greek
        "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u",
        "ν": "v", "ο": "o", "π": "n", "ρ": "p", "σ": "o", "ς": "c", "τ": "t", "υ": "u",
        "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
        # Latin small capitals and other look-alikes
        "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d",
        "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m",
        "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v",
        "ᴡ": "w", "ʏ": "y", "ᴢ": "z",
    }
)  # fmt: skip

_LEET = str.maketrans(
    {"0": "o", "1": "i", "l": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
_SPACES = re.compile(r"\s+")
# Runs of at least three single letters each followed by one separator: "f u c k", "f.u.c.k".
_SPACED_LETTERS = re.compile(r"(?<![^\W_])(?:[^\W_][\s.\-_*·,]){2,}[^\W_](?![^\W_])")
_SEPARATORS = re.compile(r"[\s.\-_*·,]")


def normalize(text: str) -> str:
    """Lower case, NFKC, no diacritics, no invisible characters, look-alikes folded to Latin."""
    if text.isascii():  # every step below but the case and the spaces leaves ASCII as it is
        return _SPACES.sub(" ", text.lower())
    text = unicodedata.normalize("NFKC", text.translate(INVISIBLE_CHARS)).casefold()
    decomposed = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    text = unicodedata.normalize("NFC", text).translate(_CONFUSABLES)
    return _SPACES.sub(" ", text)


def leet_fold(normalized: str) -> str:
    """Common leetspeak folded onto letters (apply to `normalize` output, on both sides)."""
    return normalized.translate(_LEET)


def join_spaced_letters(text: str) -> str:
    return _SPACED_LETTERS.sub(lambda m: _SEPARATORS.sub("", m.group(0)), text)


@dataclass(frozen=True)
class NormalizedText:
    """The variants of one text that matchers look at."""

    raw: str
    basic: str
    leet: str
    joined: str

    @classmethod
    def of(cls, text: str) -> NormalizedText:
        basic = normalize(text)
        leet = leet_fold(basic)
        return cls(raw=text, basic=basic, leet=leet, joined=join_spaced_letters(leet))

    def folded_variants(self) -> tuple[str, ...]:
        return (self.leet,) if self.joined == self.leet else (self.leet, self.joined)


# -- compiling terms and regexes -------------------------------------------------------------

_TOKEN_SPLIT = re.compile(r"[\W_]+")
_TERM_SEP = r"[\W_]{1,4}"
# A group with a repeating quantifier inside, itself repeated: (a+)+, (\w*\s?)*, (x{2,})*.
_NESTED_QUANTIFIER = re.compile(
    r"\((?:[^()\\]|\\.)*?(?:[+*]|\{\d*,\d*\})(?:[^()\\]|\\.)*\)(?:[+*]|\{\d*,?\d*\})"
)


def term_tokens(term: str, *, folded: bool) -> list[str]:
    norm = normalize(term)
    if folded:
        norm = leet_fold(norm)
    return [t for t in _TOKEN_SPLIT.split(norm) if t]


def check_term(term: str) -> str:
    """Validate one word or phrase; returns it, or raises ValueError."""
    if not term.strip():
        raise ValueError("a term must not be empty")
    if len(term) > MAX_TERM_CHARS:
        raise ValueError(f"a term has at most {MAX_TERM_CHARS} characters")
    if not term_tokens(term, folded=False):
        raise ValueError("a term needs letters or digits (use `regexes` for symbols)")
    return term


def check_regex(pattern: str) -> str:
    """Validate one regular expression; returns it, or raises ValueError."""
    if not pattern:
        raise ValueError("a regex must not be empty")
    if len(pattern) > MAX_REGEX_CHARS:
        raise ValueError(f"a regex has at most {MAX_REGEX_CHARS} characters")
    if _NESTED_QUANTIFIER.search(pattern):
        raise ValueError(
            "nested quantifiers such as (a+)+ can backtrack catastrophically; simplify the regex"
        )
    try:
        compiled = regex.compile(pattern, regex.IGNORECASE | regex.VERSION0)
    except regex.error as exc:
        raise ValueError(f"invalid regex: {exc}") from exc
    if compiled.search("", timeout=REGEX_TIMEOUT_S) is not None:
        raise ValueError("the regex matches the empty string (it would match every text)")
    return pattern


def _term_pattern(tokens: list[str]) -> str:
    return _TERM_SEP.join(re.escape(t) for t in tokens)


def _alternation(patterns: Iterable[str]) -> re.Pattern[str] | None:
    alts = sorted(set(patterns), key=len, reverse=True)
    if not alts:
        return None
    return re.compile(r"(?<![^\W_])(?:" + "|".join(alts) + r")(?![^\W_])")


def _bounded(pattern: str) -> re.Pattern[str]:
    return re.compile(r"(?<![^\W_])(?:" + pattern + r")(?![^\W_])")


@dataclass(frozen=True)
class BlocklistMatch:
    list: str
    term: str | None = None
    regex: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"list": self.list}
        if self.term is not None:
            out["term"] = self.term
        if self.regex is not None:
            out["regex"] = self.regex
        return out


@dataclass
class CompiledBlocklist:
    """One list, compiled once (at policy load); `find` is cheap when nothing matches."""

    name: str
    terms: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    stages: frozenset[Stage] = frozenset({"input", "output"})
    action: Literal["block", "annotate"] = "block"
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.terms) > MAX_TERMS_PER_LIST:
            raise ValueError(f"a blocklist has at most {MAX_TERMS_PER_LIST} terms")
        for term in self.terms:
            check_term(term)
        for pattern in self.regexes:
            check_regex(pattern)
        self._per_term: list[tuple[str, re.Pattern[str], re.Pattern[str]]] = []
        basic_alts, folded_alts = [], []
        for term in self.terms:
            basic = _term_pattern(term_tokens(term, folded=False))
            folded = _term_pattern(term_tokens(term, folded=True))
            basic_alts.append(basic)
            folded_alts.append(folded)
            self._per_term.append((term, _bounded(basic), _bounded(folded)))
        self._basic = _alternation(basic_alts)
        self._folded = _alternation(folded_alts)
        self._regexes = [
            (p, regex.compile(p, regex.IGNORECASE | regex.VERSION0)) for p in self.regexes
        ]

    def find(self, text: NormalizedText | str) -> list[BlocklistMatch]:
        """What matched in the text (empty when nothing did). Raises TimeoutError when a regex
        runs past its time budget (the guard then fails, and the policy decides)."""
        norm = text if isinstance(text, NormalizedText) else NormalizedText.of(text)
        matches: list[BlocklistMatch] = []
        folded_texts = norm.folded_variants()
        hit_basic = self._basic is not None and self._basic.search(norm.basic) is not None
        hit_folded = self._folded is not None and any(
            self._folded.search(t) is not None for t in folded_texts
        )
        if hit_basic or hit_folded:
            for term, basic, folded in self._per_term:
                if basic.search(norm.basic) or any(folded.search(t) for t in folded_texts):
                    matches.append(BlocklistMatch(list=self.name, term=term))
        for source, pattern in self._regexes:
            if pattern.search(norm.basic, timeout=REGEX_TIMEOUT_S) is not None:
                matches.append(BlocklistMatch(list=self.name, regex=source))
        return matches

    def score(self, matches: Sequence[BlocklistMatch]) -> float:
        """1.0 for any match unless `weights` gives terms their own score (the highest wins)."""
        if not matches:
            return 0.0
        return max(self.weights.get(m.term or "", 1.0) for m in matches)


# -- the guard -------------------------------------------------------------------------------


class BlocklistGuard(Guard):
    """Checks the stage's text against the policy's custom blocklists for that stage."""

    name = "blocklist"
    stages: frozenset[Stage] = frozenset({"input", "output"})

    def __init__(self, lists: Sequence[CompiledBlocklist] = ()) -> None:
        self.lists = tuple(lists)

    @classmethod
    def from_policy(cls, policy: Policy) -> BlocklistGuard:
        return cls(policy.compiled_blocklists)

    def for_policy(self, policy: Policy) -> BlocklistGuard:
        """The pipeline calls this to get the guard bound to one policy's lists."""
        return self.from_policy(policy)

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        if not self.lists:
            return [self.check_one(item) for item in items]
        if sum(len(item.text_to_check()) for item in items) > INLINE_MAX_CHARS:
            # Long texts take milliseconds or more: keep the event loop free.
            return await asyncio.to_thread(lambda: [self.check_one(i) for i in items])
        return [self.check_one(item) for item in items]

    def check_one(self, item: GuardInput) -> GuardVerdict:
        started = time.perf_counter()
        lists = [b for b in self.lists if item.stage in b.stages]
        categories: dict[str, CategoryScore] = {}
        found: list[dict[str, Any]] = []
        if lists:
            norm = NormalizedText.of(item.text_to_check())
            for blocklist in lists:
                try:
                    matches = blocklist.find(norm)
                except TimeoutError:
                    # This item fails (the policy decides); the other items of the batch do not.
                    return GuardVerdict(
                        guard=self.name,
                        latency_s=time.perf_counter() - started,
                        error=f"a regex of blocklist {blocklist.name!r} ran out of time",
                    )
                if matches:
                    score = blocklist.score(matches)
                    categories[f"blocklist:{blocklist.name}"] = CategoryScore(
                        score=score, severity="high", detected=True
                    )
                    found.extend(m.as_dict() for m in matches)
        return GuardVerdict(
            guard=self.name,
            categories=categories,
            latency_s=time.perf_counter() - started,
            details={"matches": found} if found else {},
        )
