"""The streamed checks' context: its compact form and its size from the policy."""

from __future__ import annotations

import random
import unicodedata

from guards import blocklist
from guards.policy_loader import parse_policy
from guards.stream_context import (
    MIN_CONTEXT_CHARS,
    MODEL_GUARD_CONTEXT_CHARS,
    REGEX_SPAN_CAP,
    compact,
    regex_span,
    stream_context_chars,
    term_span,
)


def test_compact_folds_padding_but_keeps_words_and_lines() -> None:
    assert compact("bad" + " " * 500 + "phrase") == "bad phrase"
    assert compact("one.\n\n\n   two") == "one.\ntwo"
    assert compact("f\u200bo\u200do\u2060") == "foo"
    assert compact("e" + "\u0301" * 40 + "x") == "e\u0301\u0301x"
    assert compact("naïve café") == "naïve café"


def test_compact_text_normalises_as_the_original() -> None:
    rng = random.Random(5)
    alphabet = "ab c.\n\t\u200b\u0301\u00e9 \u3000xyz"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert blocklist.normalize(compact(text)) == blocklist.normalize(text), repr(text)


def test_term_and_regex_spans() -> None:
    assert term_span("shit") == 8  # "s h i t": a separator after each letter
    assert term_span("bad phrase") == 2 * (9 + 4)
    assert regex_span(r"\d{3}-\d{4}") == 8
    assert regex_span(r"secret\W{1,16}code") == 26
    assert regex_span(r"secret.*leak") == REGEX_SPAN_CAP  # unbounded
    assert regex_span(r"\p{L}{3}") == REGEX_SPAN_CAP  # the regex module's own syntax


def test_the_context_is_sized_from_the_policy() -> None:
    def policy(guards: str, lists: str = "") -> str:
        return f"name: p\nversion: '1'\nguards:\n{guards}{lists}"

    plain = parse_policy(policy("  blocklist: {stages: [input, output]}\n"))
    assert stream_context_chars(plain) == MIN_CONTEXT_CHARS
    long_term = "one two three four five six seven eight nine ten eleven twelve"
    with_term = parse_policy(
        policy(
            "  blocklist: {stages: [input, output]}\n",
            f"custom_blocklists:\n  - {{name: l, terms: [{long_term}], stage: output}}\n",
        )
    )
    assert stream_context_chars(with_term) == 3 * term_span(long_term)
    input_only = parse_policy(
        policy(
            "  blocklist: {stages: [input, output]}\n",
            f"custom_blocklists:\n  - {{name: l, terms: [{long_term}], stage: input}}\n",
        )
    )
    assert stream_context_chars(input_only) == MIN_CONTEXT_CHARS
    models = parse_policy(
        policy("  blocklist: {stages: [input, output]}\n  llama_guard: {stages: [output]}\n")
    )
    assert stream_context_chars(models) == MODEL_GUARD_CONTEXT_CHARS
    # Llama Guard listed but skipped (optional, no weights): the guards that run decide.
    assert stream_context_chars(models, ["blocklist"]) == MIN_CONTEXT_CHARS


def _normalize_the_long_way(text: str) -> str:
    text = unicodedata.normalize("NFKC", text.translate(blocklist.INVISIBLE_CHARS)).casefold()
    decomposed = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    text = unicodedata.normalize("NFC", text).translate(blocklist._CONFUSABLES)
    return blocklist._SPACES.sub(" ", text)


def test_ascii_text_normalises_as_the_full_path_does() -> None:
    rng = random.Random(7)
    alphabet = "".join(chr(i) for i in range(128))
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert blocklist.normalize(text) == _normalize_the_long_way(text), repr(text)
