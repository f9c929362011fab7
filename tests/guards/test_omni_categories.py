"""Moderation results from decisions (the omni mapping) and policy coverage (what is judged)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from guards.base import CategoryScore, Guard, GuardInput, GuardVerdict, Stage
from guards.coverage import cannot_judge, hint, missing_required, stage_coverage
from guards.decision import decide
from guards.omni_categories import OMNI_CATEGORIES, moderation_result
from guards.policy_loader import load_policy, parse_policy

DEFAULT = load_policy(Path(__file__).resolve().parents[2] / "policies" / "default.yaml")
CODES = tuple(f"S{i}" for i in range(1, 14))


def lg(scores: dict[str, float], listed: tuple[str, ...], *, image: bool) -> GuardVerdict:
    cats = {
        c: CategoryScore(scores.get(c, 0.0), "high" if c in listed else "safe", c in listed)
        for c in CODES
    }
    return GuardVerdict("llama_guard", cats, details={"image": image})


def test_codes_map_onto_omni_with_their_own_scores_and_the_policy_flags() -> None:
    verdict = lg({"S1": 0.97, "S2": 0.2, "S6": 0.93}, ("S1", "S6"), image=False)
    decision = decide(DEFAULT, "input", [verdict])
    result = moderation_result(DEFAULT, decision, has_text=True)
    assert result["category_scores"]["violence"] == 0.97
    assert result["category_scores"]["illicit/violent"] == 0.97  # S1 judges both
    assert result["category_scores"]["illicit"] == 0.2  # S2, not listed: a score, no flag
    assert result["categories"]["violence"] and not result["categories"]["illicit"]
    assert result["gateway_categories"]["S6"] == {"flagged": True, "score": 0.93}
    assert result["flagged"] and result["blocked"]
    for never in ("harassment", "hate/threatening", "violence/graphic", "self-harm/intent"):
        assert result["category_scores"][never] == 0.0
        assert result["category_applied_input_types"][never] == []
    assert result["category_applied_input_types"]["hate"] == ["text"]  # judged (S10), on text


def test_image_is_listed_only_when_the_guard_saw_one() -> None:
    # A text Llama Guard on an input with an image: it did not see the image.
    text_lg = decide(DEFAULT, "input", [lg({}, (), image=False)])
    applied = moderation_result(DEFAULT, text_lg, has_text=True)["category_applied_input_types"]
    assert all("image" not in v for v in applied.values())
    vision = decide(DEFAULT, "input", [lg({}, (), image=True)])
    applied = moderation_result(DEFAULT, vision, has_text=False)["category_applied_input_types"]
    assert applied["sexual"] == ["image"]  # image-only input: no text was judged


def test_excluded_and_failed_are_not_judged() -> None:
    policy = parse_policy(
        "version: 1\nguards:\n  llama_guard: {stages: [input], on_error: allow}\n"
        "excluded_categories: [hate]\n",
        stem="x",
    )
    result = moderation_result(
        policy, decide(policy, "input", [lg({"S10": 0.99}, ("S10",), image=False)]), has_text=True
    )
    assert result["category_scores"]["hate"] == 0.0 and not result["flagged"]
    failed = decide(policy, "input", [GuardVerdict("llama_guard", error="boom")])
    result = moderation_result(policy, failed, has_text=True)
    assert all(v == 0.0 for v in result["category_scores"].values())
    assert result["errors"] == ["llama_guard: boom"] and not result["flagged"]  # on_error allow
    assert set(result["categories"]) == set(OMNI_CATEGORIES)


class Loaded(Guard):
    """A guard as coverage sees it: its stages and, when it says, the categories it reports."""

    def __init__(self, stages: frozenset[Stage], judged: frozenset[str] | None = None) -> None:
        self.name = "loaded"
        self.stages = stages
        self._judged = judged

    @property
    def judged_categories(self) -> frozenset[str] | None:
        return self._judged

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        raise AssertionError("coverage never runs a guard")


def test_coverage_without_and_with_llama_guard() -> None:
    embedded: dict[str, Guard] = {
        "profanity": Loaded(frozenset({"input", "output"})),
        "jailbreak_heuristic": Loaded(frozenset({"input"})),
        "language": Loaded(frozenset({"input", "output"})),  # built in
    }
    gaps = cannot_judge(DEFAULT, embedded)
    assert gaps == {c: ["input", "output"] for c in ("hate", "self_harm", "sexual", "violence")}
    assert "GATEWAY_LLAMA_GUARD_PATH" in hint("hate")
    with_lg = {
        **embedded,
        "llama_guard": Loaded(frozenset({"input", "output"}), judged=frozenset(CODES)),
    }
    assert cannot_judge(DEFAULT, with_lg) == {}
    assert stage_coverage(DEFAULT, with_lg, "output") == {
        "hate", "self_harm", "sexual", "violence", "profanity", "S2", "S5", "S6", "S7", "S8",
        "S13",
    }  # fmt: skip
    assert missing_required(DEFAULT, embedded) == []  # its model guards are optional
    strict_lg = parse_policy("version: 1\nguards:\n  llama_guard: {stages: [input]}\n", stem="s")
    assert missing_required(strict_lg, embedded) == ["llama_guard"]
