"""Custom blocklists: normalisation defeats cheap evasions; near-misses stay clean."""

from __future__ import annotations

import pytest

from guards.base import GuardInput
from guards.blocklist import (
    BlocklistGuard,
    CompiledBlocklist,
    NormalizedText,
    check_regex,
    normalize,
)
from model.engine import ChatTurn, TextPart

LIST = CompiledBlocklist(name="secrets", terms=("hello", "project falcon", "GATEWAY-CANARY-BLOCK"))


def _terms(text: str) -> list[str | None]:
    return [m.term for m in LIST.find(text)]


@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("HELLO there", "hello"),  # case
        ("ｈｅｌｌｏ there", "hello"),  # NFKC fullwidth
        ("𝐡𝐞𝐥𝐥𝐨 there", "hello"),  # NFKC mathematical bold
        ("hеllo there", "hello"),  # Cyrillic 'е'
        ("hellо", "hello"),  # Cyrillic 'о'
        ("HΕLLO", "hello"),  # Greek capital epsilon
        ("he\u200bllo", "hello"),  # zero-width space
        ("h\u00adel\u200dlo", "hello"),  # soft hyphen and zero-width joiner
        ("héllö", "hello"),  # diacritics
        ("h3ll0", "hello"),  # leetspeak 3->e, 0->o
        ("he11o", "hello"),  # 1 -> l
        ("h e l l o", "hello"),  # spaced out
        ("h.e.l.l.o!", "hello"),  # dotted
        ("Project  Falcon is secret", "project falcon"),  # phrase, extra spaces
        ("project-falcon", "project falcon"),  # phrase, punctuation between words
        ("pr0ject f4lc0n", "project falcon"),  # phrase in leetspeak
        ("say gateway canary block", "GATEWAY-CANARY-BLOCK"),  # separators are flexible
        ("GATEWAY-CANARY-BLOCK", "GATEWAY-CANARY-BLOCK"),
        ("gatewаy-cаnary-block", "GATEWAY-CANARY-BLOCK"),  # Cyrillic 'а'
    ],
)
def test_normalised_matches(text: str, term: str) -> None:
    assert _terms(text) == [term]


@pytest.mark.parametrize(
    "text",
    [
        "othello is a play",  # inside a word
        "hellos and goodbyes",  # word boundary at the end
        "shell oil",  # across a word boundary
        "the falcon project",  # phrase words in another order
        "project management and falconry",
        "gateway canary",  # part of a phrase
        "h-e-l-p",
        "",
    ],
)
def test_near_misses_do_not_match(text: str) -> None:
    assert LIST.find(text) == []


def test_normalize() -> None:
    assert normalize("ＡＢＣ\u200b  Ｄ") == "abc d"
    assert normalize("Straße") == "strasse"
    assert normalize("рaураl") == "paypal"  # Cyrillic р, у, а


def test_normalized_text_variants() -> None:
    norm = NormalizedText.of("$h1t")
    assert norm.basic == "$h1t"
    assert norm.leet == "shit"


def test_regexes_run_on_normalised_text() -> None:
    blocklist = CompiledBlocklist(name="ids", regexes=(r"\bacct-\d{6}\b",))
    (match,) = blocklist.find("Account ＡＣＣＴ-123456 is mine")
    assert match.regex == r"\bacct-\d{6}\b"
    assert match.as_dict() == {"list": "ids", "regex": r"\bacct-\d{6}\b"}
    assert blocklist.find("ACCT-12345") == []


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(a+)+$", "nested quantifiers"),
        (r"(\w*\s?)*x", "nested quantifiers"),
        ("(x{2,})*", "nested quantifiers"),
        ("[unclosed", "invalid regex"),
        ("a" * 257, "at most 256"),
        ("x?", "matches the empty string"),
        ("", "must not be empty"),
    ],
)
def test_unsafe_or_invalid_regexes_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_regex(pattern)


def test_safe_regexes_are_accepted() -> None:
    for pattern in (r"\bsecret-\d+\b", "foo|bar", r"(?:ab)+c", r"[a-z]{3}-\d{2}"):
        assert check_regex(pattern) == pattern


def test_compiled_list_validates_its_input() -> None:
    with pytest.raises(ValueError, match="nested quantifiers"):
        CompiledBlocklist(name="x", regexes=("(a*)*",))
    with pytest.raises(ValueError, match="letters or digits"):
        CompiledBlocklist(name="x", terms=("!!!",))


def test_weights_give_the_score() -> None:
    blocklist = CompiledBlocklist(name="w", terms=("mild", "strong"), weights={"mild": 0.6})
    assert blocklist.score(blocklist.find("a mild word")) == 0.6
    assert blocklist.score(blocklist.find("mild and strong")) == 1.0
    assert blocklist.score([]) == 0.0


async def test_guard_reports_matching_lists_per_stage() -> None:
    lists = [
        CompiledBlocklist(name="in", terms=("alpha",), stages=frozenset({"input"})),
        CompiledBlocklist(name="out", terms=("alpha",), stages=frozenset({"output"})),
        CompiledBlocklist(name="both", terms=("beta",)),
    ]
    guard = BlocklistGuard(lists)
    prompt = GuardInput(
        stage="input",
        messages=(
            ChatTurn("system", (TextPart("be nice"),)),
            ChatTurn("user", (TextPart("ALPHA and b3ta"),)),
        ),
    )
    completion = GuardInput(stage="output", messages=(), completion="alpha")
    clean = GuardInput(stage="input", messages=(ChatTurn("user", (TextPart("gamma"),)),))
    v_in, v_out, v_clean = await guard.check([prompt, completion, clean])
    assert sorted(v_in.categories) == ["blocklist:both", "blocklist:in"]
    assert v_in.categories["blocklist:in"].detected
    assert v_in.categories["blocklist:in"].severity == "high"
    assert {"list": "in", "term": "alpha"} in v_in.details["matches"]
    assert sorted(v_out.categories) == ["blocklist:out"]
    assert v_clean.categories == {} and v_clean.details == {}
    assert v_in.guard == "blocklist"


def test_large_lists_stay_fast() -> None:
    import time

    terms = tuple(f"term{i}x" for i in range(2000))
    blocklist = CompiledBlocklist(name="big", terms=terms)
    text = "lorem ipsum dolor sit amet " * 400
    started = time.perf_counter()
    for _ in range(5):
        assert blocklist.find(text) == []
    assert time.perf_counter() - started < 2.0
    assert [m.term for m in blocklist.find("a TERM1999X here")] == ["term1999x"]


def test_a_slow_regex_runs_out_of_time() -> None:
    # Passes the load-time checks but backtracks exponentially on this text.
    blocklist = CompiledBlocklist(name="slow", regexes=(r"(?:\w|\w\w)*\W\d",))
    with pytest.raises(TimeoutError):
        blocklist.find("a" * 40 + "!")
    assert blocklist.find("ab !1") != []
