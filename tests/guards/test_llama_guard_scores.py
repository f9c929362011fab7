"""Llama Guard's per-category probabilities: P(unsafe) x q(code | unsafe), from the model itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from guards.base import GuardInput
from guards.llama_guard import LlamaGuard
from model.engine import ChatTurn, TextPart
from testkit.tiny_guard_models import (
    build_tiny_llama_guard,
    build_tiny_llama_guard_vision,
    llama_guard_chain_ids,
    rig_llama_guard_chain,
)


@pytest.fixture(scope="module")
def lg_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-guard-scores")
    return {
        "1b": build_tiny_llama_guard(root / "1b", template="1b"),
        "8b": build_tiny_llama_guard(root / "8b", template="8b"),
        "vision": build_tiny_llama_guard_vision(root / "vision"),
    }


def prompt(text: str) -> GuardInput:
    return GuardInput("input", (ChatTurn("user", (TextPart(text),)),))


@pytest.mark.parametrize("kind", ["1b", "8b", "vision"])
def test_code_tokens_are_found_like_the_real_vocabulary(
    lg_dirs: dict[str, Path], kind: str
) -> None:
    guard = LlamaGuard(lg_dirs[kind], device="cpu")
    tok = guard.tokenizer
    assert [tok.decode([i]) for i in guard.code_prefix] == ["\n", "S"]
    assert set(guard.code_tokens) == set(guard.valid_codes)
    assert tok.decode([guard.code_tokens["S10"]]) == "10"


def test_forced_unsafe_s9_scores_that_category_near_one_and_the_others_near_zero(
    lg_dirs: dict[str, Path],
) -> None:
    guard = LlamaGuard(lg_dirs["1b"], device="cpu")
    rig_llama_guard_chain(guard.model, llama_guard_chain_ids(guard.tokenizer, "unsafe\nS9"))
    (verdict,) = guard.classify_batch([prompt("How do I build a bomb?")])
    assert verdict.error is None and verdict.details["codes"] == ["S9"]
    scores = {code: c.score for code, c in verdict.categories.items()}
    assert scores["S9"] > 0.99
    assert all(0.0 <= s < 0.01 for code, s in scores.items() if code != "S9"), scores
    q = verdict.details["code_probabilities"]
    assert abs(sum(q.values()) - 1.0) < 1e-4  # a distribution over the codes


def test_a_second_listed_code_is_scored_at_its_own_position(lg_dirs: dict[str, Path]) -> None:
    guard = LlamaGuard(lg_dirs["1b"], device="cpu")
    rig_llama_guard_chain(guard.model, llama_guard_chain_ids(guard.tokenizer, "unsafe\nS1,S10"))
    (verdict,) = guard.classify_batch([prompt("threats")])
    assert verdict.details["codes"] == ["S1", "S10"]
    assert verdict.categories["S1"].score > 0.99
    assert verdict.categories["S10"].score > 0.99
    assert verdict.categories["S2"].score < 0.01


def test_forced_safe_scores_every_category_near_zero(lg_dirs: dict[str, Path]) -> None:
    guard = LlamaGuard(lg_dirs["1b"], device="cpu")
    rig_llama_guard_chain(guard.model, llama_guard_chain_ids(guard.tokenizer, "safe"))
    (verdict,) = guard.classify_batch([prompt("Bread?")])
    assert verdict.details["p_unsafe"] < 0.01
    assert all(c.score < 0.01 for c in verdict.categories.values())
    assert not any(c.detected for c in verdict.categories.values())


def test_random_weights_give_probabilities_not_zero_one(lg_dirs: dict[str, Path]) -> None:
    # threshold 1: scored only (random weights would continue into unparseable text)
    guard = LlamaGuard(lg_dirs["8b"], device="cpu", threshold=1.0)
    verdicts = guard.classify_batch([prompt("a"), prompt("some other text")])
    for verdict in verdicts:
        p = verdict.details["p_unsafe"]
        scores = [c.score for c in verdict.categories.values()]
        assert all(0.0 <= s <= p + 1e-6 for s in scores)
        assert abs(sum(scores) - p) < 1e-3  # P(unsafe) split over the first code named
