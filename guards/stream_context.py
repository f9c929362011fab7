"""How much already-released text a streamed check must see again, and in what form.

The stream moderator (`guards.stream_moderator`) checks each new piece of an answer together with
the end of the text already released before it, so that a blocked term or regex match that starts
in released text and ends in the new piece is still found. This module sizes that context from
a policy (`stream_context_chars`) and keeps it compact (`compact`).

Compact form: runs of whitespace become one character (a newline when the run had one),
invisible characters (zero-width, bidi controls, tags: the blocklist's list) are dropped, and at
most `MAX_COMBINING_RUN` combining marks follow a character. The blocklist's normalisation does
the same or more (it collapses whitespace, drops invisibles and every combining mark), so the
guards judge a term in the compact context as they would in the original text; padding a term
with thousands of spaces or zero-width characters cannot push its start out of the context.

Bound: a match found by the blocklist spans at most `S` normalised characters, which come from
at most `3 * S` compact characters (a base letter and up to two combining marks, or three
Hangul jamo that compose into one syllable). A term's normalised span is at most its tokens plus
four separators between two tokens (`[\\W_]{1,4}`), doubled for spaced-out letters (`f.o.o`
matches `foo`). A regex's span is its maximum width when Python's parser can tell it, at most
`REGEX_SPAN_CAP` (also for an unbounded `.*` or `\w+`, or syntax only the `regex` module
knows): a longer match is still caught by the final check of the whole answer, but its first
part may have been sent by then (documented in docs/policies.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import TYPE_CHECKING

import regex

from guards.blocklist import INVISIBLE_CHARS, term_tokens

if TYPE_CHECKING:
    from guards.policy import Policy

# Every check sees at least this much context before the new text.
MIN_CONTEXT_CHARS = 64
# A model guard (Llama Guard, Prompt Guard) judges meaning, not words: it sees more.
MODEL_GUARD_CONTEXT_CHARS = 1000
MODEL_GUARDS = frozenset({"llama_guard", "prompt_guard"})
# How much further back a check's context may reach to begin at the start of a sentence or
# line (the classifiers judge sentences).
SENTENCE_REACH_CHARS = 96
# Assumed span of a regex whose width has no bound (`.*`, `\w+`), cannot be computed, or is
# larger than this.
REGEX_SPAN_CAP = 512
MAX_COMBINING_RUN = 2
# Compact characters per normalised character (see the module doc).
_COMPACT_PER_NORMALISED = 3
_SEPARATOR_MAX = 4  # the blocklist's `[\W_]{1,4}` between the words of a term

_WHITESPACE_RUN = re.compile(r"\s{2,}")
_COMBINING_RUN = regex.compile(rf"(\p{{Mn}}{{{MAX_COMBINING_RUN}}})\p{{Mn}}+")


def _one_space(match: re.Match[str]) -> str:
    return "\n" if "\n" in match.group(0) else " "


def compact(text: str) -> str:
    """The text as the context of a streamed check keeps it (see the module doc)."""
    text = text.translate(INVISIBLE_CHARS)
    text = _WHITESPACE_RUN.sub(_one_space, text)
    compacted: str = _COMBINING_RUN.sub(r"\1", text)
    return compacted


def term_span(term: str) -> int:
    """Most normalised characters a match of this blocklist term can span."""
    spans = []
    for folded in (False, True):
        tokens = term_tokens(term, folded=folded)
        spans.append(sum(map(len, tokens)) + _SEPARATOR_MAX * max(0, len(tokens) - 1))
    return 2 * max(spans)  # spaced-out letters: one separator after each letter


def regex_span(pattern: str) -> int:
    """Most normalised characters a match of this regex can span, capped at `REGEX_SPAN_CAP`
    (also the answer when the width is unbounded or the `regex` module's syntax is beyond
    Python's parser)."""
    try:
        _, high = sre_parse.parse(pattern, re.IGNORECASE).getwidth()
    except (re.error, TypeError, ValueError, OverflowError, RecursionError):
        return REGEX_SPAN_CAP
    return max(1, min(int(high), REGEX_SPAN_CAP))


@functools.cache
def _profanity_words_span() -> int:
    from guards.profanity import MILD_WORDS, STRONG_WORDS

    return max(term_span(w) for w in (*STRONG_WORDS, *MILD_WORDS))


def _uncached_context_chars(policy: Policy, guards: frozenset[str]) -> int:
    span = 0
    if "blocklist" in guards:
        for blocklist in policy.compiled_blocklists:
            if "output" not in blocklist.stages:
                continue
            span = max([span, *map(term_span, blocklist.terms)])
            span = max([span, *map(regex_span, blocklist.regexes)])
    if "profanity" in guards:
        span = max(span, _profanity_words_span())
    floor = MODEL_GUARD_CONTEXT_CHARS if guards & MODEL_GUARDS else MIN_CONTEXT_CHARS
    return max(floor, _COMPACT_PER_NORMALISED * span)


# Per policy object and guard set (a reloaded policy is a new object); bounded like
# GuardPipelines' cache.
_CACHE: dict[tuple[int, frozenset[str]], tuple[Policy, int]] = {}
_CACHE_MAX = 64


def stream_context_chars(policy: Policy, output_guards: Iterable[str] | None = None) -> int:
    """Compact characters of already-checked text that each streamed check of this policy's
    output must see before the new text: enough for the longest match of its output
    blocklists (and the profanity guard's word list), never less than `MIN_CONTEXT_CHARS`, or
    `MODEL_GUARD_CONTEXT_CHARS` when a model guard checks the output. `output_guards`: the
    guards that run on the output (default: those the policy lists)."""
    names = frozenset(
        (name for name, _ in policy.guards_for("output"))
        if output_guards is None
        else output_guards
    )
    hit = _CACHE.get((id(policy), names))
    if hit is not None and hit[0] is policy:
        return hit[1]
    chars = _uncached_context_chars(policy, names)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[(id(policy), names)] = (policy, chars)
    return chars
