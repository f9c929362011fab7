"""decide(): thresholds, actions, mapping, exclusions, guard errors, and the Azure shapes."""

from __future__ import annotations

from typing import Any

import pytest

from guards.base import CategoryScore, GuardVerdict, Severity
from guards.content_filter import choice_results, prompt_filter_results
from guards.decision import decide
from guards.policy import Policy
from guards.policy_loader import parse_policy

BASE = """
version: 3
name: t
guards:
  blocklist: {stages: [input, output]}
  profanity: {stages: [input, output]}
  jailbreak_heuristic: {stages: [input]}
  llama_guard: {stages: [input, output], optional: true}
defaults: {threshold: medium, action: block}
categories:
  profanity: {threshold: low, action: annotate}
{cats}custom_blocklists:
  - {name: canary, terms: [GATEWAY-CANARY-BLOCK], stage: input, action: block}
  - {name: watch, terms: [falcon], stage: both, action: annotate}
"""

SCORE = {"safe": 0.1, "low": 0.6, "medium": 0.8, "high": 0.95}


def _policy(extra: str = "", cats: str = "") -> Policy:
    return parse_policy(BASE.replace("{cats}", cats) + extra, stem="t")


def _v(guard: str, **cats: Any) -> GuardVerdict:
    return GuardVerdict(
        guard=guard,
        categories={
            k: CategoryScore(score=SCORE[s], severity=s, detected=s != "safe")
            for k, s in cats.items()
        },
    )


def _lg(**codes: Severity) -> GuardVerdict:
    return _v("llama_guard", **codes)


def test_nothing_found_is_safe_and_allowed() -> None:
    decision = decide(_policy(), "input", [_v("profanity", profanity="safe")])
    assert not decision.blocked
    assert decision.reasons == [] and decision.hits == {}
    results = decision.content_filter_results()
    # Unjudged (only profanity ran): the seed's shape, no claimed severity or detection.
    assert results["hate"] == {"filtered": False}
    assert results["jailbreak"] == {"filtered": False}
    assert results["indirect_attack"] == {"filtered": False}
    assert results["profanity"] == {"filtered": False, "detected": False}
    assert results["custom_blocklists"] == {"filtered": False, "details": []}
    assert "llama_guard" not in results  # it did not run
    assert "error" not in results


@pytest.mark.parametrize(
    ("severity", "blocked"), [("safe", False), ("low", False), ("medium", True), ("high", True)]
)
def test_threshold_medium(severity: Severity, blocked: bool) -> None:
    decision = decide(_policy(), "output", [_v("x", jailbreak=severity)])
    assert decision.blocked is blocked
    results = decision.content_filter_results()
    assert results["jailbreak"] == {"filtered": blocked, "detected": blocked}
    assert "indirect_attack" not in results  # prompts only


@pytest.mark.parametrize(
    ("threshold", "severity", "hit"),
    [
        ("low", "low", True),
        ("low", "safe", False),
        ("high", "medium", False),
        ("high", "high", True),
    ],
)
def test_thresholds(threshold: str, severity: Severity, hit: bool) -> None:
    policy = _policy(cats=f"  violence: {{threshold: {threshold}, action: block}}\n")
    decision = decide(policy, "input", [_lg(S1=severity)])
    assert decision.blocked is hit
    results = decision.content_filter_results()
    # Severity categories always report their severity, filtered only on a hit.
    assert results["violence"] == {"filtered": hit, "severity": severity}


def test_annotate_reports_without_blocking() -> None:
    decision = decide(_policy(), "input", [_v("profanity", profanity="high")])
    assert not decision.blocked
    assert decision.hits == {"profanity": "annotate"}
    assert decision.content_filter_results()["profanity"] == {"filtered": False, "detected": True}


def test_detected_flag_counts_as_low() -> None:
    verdict = GuardVerdict(
        guard="g", categories={"profanity": CategoryScore(0.4, "safe", detected=True)}
    )
    decision = decide(_policy(), "input", [verdict])
    assert decision.hits == {"profanity": "annotate"}


def test_highest_severity_across_guards_wins() -> None:
    decision = decide(_policy(), "input", [_v("a", jailbreak="low"), _v("b", jailbreak="high")])
    assert decision.blocked
    assert decision.reasons == ["jailbreak (high >= medium, a, b)"]


def test_llama_guard_codes_map_onto_azure_categories() -> None:
    decision = decide(_policy(), "output", [_lg(S10="high", S1="low")])
    results = decision.content_filter_results()
    assert results["hate"] == {"filtered": True, "severity": "high"}
    assert results["violence"] == {"filtered": False, "severity": "low"}
    assert results["llama_guard"] == {"filtered": False, "detected": False, "categories": []}
    assert decision.blocked


def test_unmapped_codes_go_to_the_llama_guard_key() -> None:
    policy = _policy(cats="  S6: {threshold: low, action: annotate}\n")
    decision = decide(policy, "output", [_lg(S2="high", S6="low", S13="safe")])
    results = decision.content_filter_results()
    assert results["llama_guard"] == {
        "filtered": True,
        "detected": True,
        "categories": ["S2", "S6"],
    }
    assert decision.hits == {"S2": "block", "S6": "annotate"}
    assert decision.blocked
    for azure in ("hate", "self_harm", "sexual", "violence"):  # no code reported maps to them
        assert results[azure] == {"filtered": False}


def test_custom_mapping() -> None:
    policy = _policy("llama_guard:\n  map: {S2: violence}\n")
    results = decide(policy, "output", [_lg(S2="medium", S10="high")]).content_filter_results()
    assert results["violence"]["severity"] == "medium"
    # S10 is no longer mapped in this policy: it has no Azure counterpart here (nothing judged
    # hate).
    assert results["hate"] == {"filtered": False}
    assert results["llama_guard"]["categories"] == ["S10"]


def test_azure_keys_of_a_code_reporting_verdict_are_ignored() -> None:
    verdict = _lg(S10="high")
    verdict.categories["hate"] = CategoryScore(0.95, "high", True)
    policy = _policy("excluded_categories: [S10]\n")
    decision = decide(policy, "output", [verdict])
    assert not decision.blocked
    assert decision.content_filter_results()["hate"] == {"filtered": False}


def test_excluded_categories_are_dropped() -> None:
    policy = _policy("excluded_categories: [sexual, S2, jailbreak]\n")
    verdicts = [_lg(S12="high", S2="high"), _v("j", jailbreak="high")]
    decision = decide(policy, "input", verdicts)
    assert not decision.blocked
    results = decision.content_filter_results()
    assert results["sexual"] == {"filtered": False}  # excluded: nobody judged it
    assert results["jailbreak"] == {"filtered": False}
    assert results["llama_guard"]["categories"] == []


def test_unmapped_rule_applies_to_codes_without_their_own() -> None:
    policy = _policy("llama_guard:\n  unmapped: {threshold: high, action: annotate}\n")
    decision = decide(policy, "output", [_lg(S5="medium", S7="high")])
    assert not decision.blocked
    assert decision.hits == {"S7": "annotate"}


def test_blocklist_actions() -> None:
    verdict = _v("blocklist", **{"blocklist:canary": "high", "blocklist:watch": "high"})
    decision = decide(_policy(), "input", [verdict])
    assert decision.blocked
    assert decision.reasons == ["blocklist canary (blocklist)"]
    assert decision.content_filter_results()["custom_blocklists"] == {
        "filtered": True,
        "details": [{"filtered": True, "id": "canary"}, {"filtered": False, "id": "watch"}],
    }
    annotate_only = decide(_policy(), "output", [_v("b", **{"blocklist:watch": "high"})])
    assert not annotate_only.blocked
    assert annotate_only.hits == {"blocklist:watch": "annotate"}


def test_unknown_blocklist_only_annotates() -> None:
    decision = decide(_policy(), "input", [_v("x", **{"blocklist:elsewhere": "high"})])
    assert not decision.blocked
    assert decision.hits == {"blocklist:elsewhere": "annotate"}


def test_guard_error_fails_closed_by_default() -> None:
    failed = GuardVerdict(guard="llama_guard", error="timed out after 2s", latency_s=2.0)
    decision = decide(_policy(), "input", [failed, _v("profanity", profanity="safe")])
    assert decision.blocked
    assert decision.errors == {"llama_guard": "timed out after 2s"}
    assert decision.reasons == ["guard llama_guard failed: timed out after 2s"]
    assert decision.content_filter_results()["error"] == {
        "code": "guard_error",
        "message": "llama_guard: timed out after 2s",
    }
    assert decision.latencies["llama_guard"] == 2.0


def test_on_guard_error_allow() -> None:
    policy = _policy("on_guard_error: allow\n")
    decision = decide(policy, "input", [GuardVerdict(guard="profanity", error="boom")])
    assert not decision.blocked
    assert decision.errors == {"profanity": "boom"}
    assert "error" in decision.content_filter_results()


def test_per_guard_on_error_overrides() -> None:
    text = BASE.replace("{cats}", "").replace(
        "  profanity: {stages: [input, output]}",
        "  profanity: {stages: [input, output], on_error: allow}",
    )
    policy = parse_policy(text, stem="t")
    assert not decide(policy, "input", [GuardVerdict(guard="profanity", error="x")]).blocked
    assert decide(policy, "input", [GuardVerdict(guard="jailbreak_heuristic", error="x")]).blocked


def test_llama_guard_key_reported_when_it_ran() -> None:
    decision = decide(_policy(), "output", [], ran=["llama_guard"])
    assert decision.content_filter_results()["llama_guard"] == {
        "filtered": False,
        "detected": False,
        "categories": [],
    }


def test_custom_blocklists_key_follows_the_stage() -> None:
    policy = _policy()
    out_only = parse_policy(
        BASE.replace("{cats}", "")
        .replace("stage: input, action: block}", "stage: output, action: block}")
        .replace("  - {name: watch, terms: [falcon], stage: both, action: annotate}\n", ""),
        stem="t",
    )
    assert "custom_blocklists" in decide(policy, "input", []).content_filter_results()
    assert "custom_blocklists" not in decide(out_only, "input", []).content_filter_results()


def test_unknown_category_keys_are_ignored() -> None:
    decision = decide(_policy(), "input", [_v("x", weird="high")])
    assert not decision.blocked and decision.hits == {}


def test_error_body_is_azures() -> None:
    decision = decide(_policy(), "input", [_v("j", jailbreak="high")])
    body: dict[str, Any] = decision.error_body()
    error = body["error"]
    assert error["code"] == "content_filter"
    assert error["param"] == "prompt"
    assert error["status"] == 400
    assert error["type"] is None
    assert "jailbreak" in error["message"]
    inner = error["innererror"]
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"]["jailbreak"] == {"filtered": True, "detected": True}
    assert decision.prompt_filter_results() == [
        {"prompt_index": 0, "content_filter_results": decision.content_filter_results()}
    ]
    assert decision.log_fields()["policy"] == "t"
    assert decision.policy_version == "3"


def test_no_argument_builders_are_unchanged() -> None:
    safe = {  # nothing was judged: the seed's shape, keys always present
        "hate": {"filtered": False},
        "self_harm": {"filtered": False},
        "sexual": {"filtered": False},
        "violence": {"filtered": False},
        "jailbreak": {"filtered": False},
        "profanity": {"filtered": False},
    }
    assert choice_results() == safe
    assert prompt_filter_results() == [{"prompt_index": 0, "content_filter_results": safe}]
