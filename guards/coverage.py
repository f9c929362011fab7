"""What a policy can judge with the guards this process has (coverage), and what it cannot.

A category is judged at a stage when a guard of the policy that is available runs at that stage
and reports it (Llama Guard's hazard codes count towards the Azure category the policy maps them
to). This is what the start-up log, `GET /admin/policies` (`cannot_judge`) and the results of a
decision made before any guard ran (the first streamed chunk) rely on: a category outside the
coverage is never reported with a `severity` or `detected`.
"""

from __future__ import annotations

from collections.abc import Mapping

from guards.base import Guard, Stage
from guards.content_filter import DETECTION_CATEGORIES, SEVERITY_CATEGORIES
from guards.policy import LLAMA_GUARD_CODES, Policy

# The keys every content_filter_results carries: the ones an auditor reads as judged or not.
REPORTED_CATEGORIES: tuple[str, ...] = (*SEVERITY_CATEGORIES, *DETECTION_CATEGORIES)
STAGES: tuple[Stage, ...] = ("input", "output")

# Which setting gives a guard that needs weights (for the hint in logs and /admin/policies).
GUARD_SETTING = {
    "llama_guard": "GATEWAY_LLAMA_GUARD_PATH",
    "prompt_guard": "GATEWAY_PROMPT_GUARD_PATH",
}
# The guard that would judge a category, when none of the policy's does.
JUDGE_FOR = {
    "hate": "llama_guard",
    "self_harm": "llama_guard",
    "sexual": "llama_guard",
    "violence": "llama_guard",
    "jailbreak": "prompt_guard",
}


# What a guard reports when it does not say (`Guard.judged_categories` is None), by its name.
CATEGORIES_BY_NAME: dict[str, frozenset[str]] = {
    "llama_guard": frozenset(LLAMA_GUARD_CODES),
    "prompt_guard": frozenset({"jailbreak"}),
    "jailbreak_heuristic": frozenset({"jailbreak", "indirect_attack"}),
    "profanity": frozenset({"profanity"}),
}


def raw_categories(name: str, guard: Guard) -> frozenset[str]:
    """The category keys a guard reports in its verdicts (before the policy's mapping);
    blocklists report their own lists, no category."""
    declared = guard.judged_categories
    if declared is not None:
        return frozenset(declared)
    return CATEGORIES_BY_NAME.get(name, frozenset())


def policy_keys(policy: Policy, raw: frozenset[str]) -> set[str]:
    """Raw keys as the policy reports them: codes mapped, excluded categories dropped."""
    out: set[str] = set()
    for key in raw:
        if policy.is_excluded(key):
            continue
        target = policy.llama_guard_target(key) if key in LLAMA_GUARD_CODES else None
        key = target or key
        if not policy.is_excluded(key):
            out.add(key)
    return out


def stage_coverage(policy: Policy, guards: Mapping[str, Guard], stage: Stage) -> set[str]:
    """Categories the policy's available guards judge at `stage`."""
    judged: set[str] = set()
    for name, _ in policy.guards_for(stage):
        guard = guards.get(name)
        if guard is None or stage not in guard.stages:
            continue
        judged |= policy_keys(policy, raw_categories(name, guard))
    return judged


def cannot_judge(policy: Policy, guards: Mapping[str, Guard]) -> dict[str, list[str]]:
    """Reported category -> the stages at which nobody judges it (only those with a gap).
    Detection categories of the prompt (jailbreak) are not expected at the output stage."""
    gaps: dict[str, list[str]] = {}
    for stage in STAGES:
        covered = stage_coverage(policy, guards, stage)
        for category in REPORTED_CATEGORIES:
            if category == "jailbreak" and stage == "output":
                continue
            if category not in covered and not policy.is_excluded(category):
                gaps.setdefault(category, []).append(stage)
    return gaps


def hint(category: str) -> str:
    """What to configure so that `category` gets a judge."""
    guard = JUDGE_FOR.get(category)
    if guard is None:
        return f"no judge; add a guard that reports {category} to the policy"
    return f"no judge; set {GUARD_SETTING[guard]} (and list {guard} in the policy)"


def missing_required(policy: Policy, guards: Mapping[str, Guard]) -> list[str]:
    """Guards the policy requires (`optional: false`) that this process does not have."""
    return [
        name
        for name, settings in policy.guards.items()
        if not settings.optional and name != "blocklist" and name not in guards
    ]
