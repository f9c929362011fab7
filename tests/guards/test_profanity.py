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


def test_the_fast_classifier_gives_the_packages_probabilities() -> None:
    """The guard's classifier (the package's fitted model as one matrix product) against the
    package's own `predict_prob`, on every line of both eval sets and on their chunks."""
    import json
    from pathlib import Path

    from profanity_check import predict_prob
    from profanity_check.profanity_check import model, vectorizer

    from guards.profanity import _load_classifier
    from guards.profanity_model import LinearProfanityModel

    assert isinstance(_load_classifier(), LinearProfanityModel)  # the fast path is taken
    assert LinearProfanityModel.of(vectorizer, model) is not None
    root = Path(__file__).resolve().parents[2] / "bench" / "guard_eval"
    texts: list[str] = []
    for name in ("embedded.jsonl", "embedded_holdout.jsonl"):
        for line in (root / name).read_text().splitlines():
            if line.strip():
                text = json.loads(line).get("text")
                if isinstance(text, str):
                    texts.append(text)
                    texts.extend(chunks(text))
    texts += ["", "fuck", "sh1t happens", "a" * 5000]
    assert len(texts) > 100
    fast = _load_classifier()(texts)
    reference = [float(p) for p in predict_prob(texts)]
    assert len(fast) == len(reference)
    assert max(abs(f - r) for f, r in zip(fast, reference, strict=True)) < 1e-12
    assert any(r > 0.9 for r in reference) and any(r < 0.1 for r in reference)


def test_a_model_of_another_shape_is_not_rewritten() -> None:
    """A model that is not calibrated linear SVMs (a future release of the package) keeps the
    package's own predict_proba."""
    from profanity_check.profanity_check import model, vectorizer
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB

    from guards.profanity_model import LinearProfanityModel

    docs = ["a good day", "a bad day", "good things", "bad things", "fine words", "rude words"]
    y = [0, 1, 0, 1, 0, 1]
    x = TfidfVectorizer().fit_transform(docs)
    assert LinearProfanityModel.of(vectorizer, LogisticRegression().fit(x, y)) is None
    naive_bayes = CalibratedClassifierCV(MultinomialNB(), cv=2).fit(x, y)
    assert LinearProfanityModel.of(vectorizer, naive_bayes) is None
    assert LinearProfanityModel.of(CountVectorizer().fit(docs), model) is None
    sublinear = TfidfVectorizer(sublinear_tf=True).fit(docs)
    assert LinearProfanityModel.of(sublinear, model) is None


async def test_short_texts_are_checked_on_the_loop_long_ones_in_a_thread() -> None:
    import threading

    from guards.profanity import INLINE_MAX_CHARS

    threads: list[threading.Thread] = []

    def classifier(texts: list[str]) -> list[float]:
        threads.append(threading.current_thread())
        return [0.0] * len(texts)

    guard = ProfanityGuard(classifier=classifier)
    await guard.check([_prompt("hello there")])
    await guard.check([_prompt("word. " * (INLINE_MAX_CHARS // 6 + 1))])
    assert threads[0] is threading.current_thread()  # no hop for a short prompt
    assert threads[1] is not threading.current_thread()  # a long one keeps the loop free
