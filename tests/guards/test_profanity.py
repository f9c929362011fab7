"""Profanity: the real packaged classifier, plus the word list for obfuscated spellings."""

from __future__ import annotations

import pytest

from guards.base import GuardInput
from guards.profanity import ProfanityGuard, chunks
from model.engine import ChatTurn, TextPart


@pytest.fixture(scope="module")
def guard() -> ProfanityGuard:
    g = ProfanityGuard()
    g.load()  # the real alt-profanity-check model (about a second)
    return g


def _prompt(text: str) -> GuardInput:
    return GuardInput(stage="input", messages=(ChatTurn("user", (TextPart(text),)),))


async def test_classifier_flags_obvious_profanity(guard: ProfanityGuard) -> None:
    texts = ["you are a fucking idiot", "this is bullshit, you asshole"]
    verdicts = await guard.check([_prompt(t) for t in texts])
    for verdict in verdicts:
        score = verdict.categories["profanity"]
        assert score.detected
        assert score.score >= 0.9
        assert score.severity == "high"
        # The classifier alone is confident on these.
        assert verdict.details["classifier_score"] >= 0.9


async def test_clean_and_tricky_texts_are_not_flagged(guard: ProfanityGuard) -> None:
    texts = [
        "Write a haiku about harbours at dawn.",
        "How do I kill a Python process?",
        "The cockpit of the plane was cramped.",
        "Scunthorpe is a town in England.",
        "Please assess the class of this assignment.",
    ]
    verdicts = await guard.check([_prompt(t) for t in texts])
    for text, verdict in zip(texts, verdicts, strict=True):
        score = verdict.categories["profanity"]
        assert not score.detected, (text, verdict.details)
        assert score.severity == "safe"
        assert "words" not in verdict.details


async def test_wordlist_catches_obfuscated_spellings(guard: ProfanityGuard) -> None:
    texts = ["what a sh1t show", "ｆｕｃｋ this", "f.u.c.k that", "$hit happens", "bullѕhit"]
    verdicts = await guard.check([_prompt(t) for t in texts])
    for text, verdict in zip(texts, verdicts, strict=True):
        assert verdict.categories["profanity"].detected, text
        assert verdict.details["wordlist_score"] == 0.95
        assert verdict.details["words"], text


async def test_mild_words_score_low(guard: ProfanityGuard) -> None:
    (verdict,) = await guard.check([_prompt("I left the crap on the table")])
    assert verdict.details["wordlist_score"] == 0.6
    assert verdict.categories["profanity"].score >= 0.6


async def test_output_stage_checks_the_completion(guard: ProfanityGuard) -> None:
    item = GuardInput(
        stage="output",
        messages=(ChatTurn("user", (TextPart("fuck"),)),),
        completion="Here is a friendly answer.",
    )
    (verdict,) = await guard.check([item])
    assert not verdict.categories["profanity"].detected


async def test_long_text_takes_the_worst_sentence(guard: ProfanityGuard) -> None:
    clean = "The weather today is mild and the harbour is calm. " * 30
    (verdict,) = await guard.check([_prompt(clean + "Fuck you. " + clean)])
    assert verdict.categories["profanity"].detected


async def test_a_fake_classifier_can_be_injected() -> None:
    seen: list[list[str]] = []

    def classifier(texts: list[str]) -> list[float]:
        seen.append(texts)
        return [0.75 for _ in texts]

    guard = ProfanityGuard(classifier=classifier)
    verdicts = await guard.check([_prompt("one. two"), _prompt("")])
    assert seen == [["one.", "two"]]
    assert verdicts[0].categories["profanity"].severity == "medium"
    assert verdicts[1].categories["profanity"].score == 0.0
    assert verdicts[0].guard == "profanity"


def test_chunks() -> None:
    assert chunks("One. Two!\nThree") == ["One.", "Two!", "Three"]
    assert len(chunks("x. " * 1000)) == 256
