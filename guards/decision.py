"""From guard verdicts to a decision under a policy (a pure function).

`decide(policy, stage, verdicts)`:

1. Categories listed in `excluded_categories` are dropped.
2. Llama Guard hazard codes (`S1`..`S14`) fold into the Azure category the policy maps them to
   (the highest severity wins); unmapped codes keep their own key and are reported under the
   `llama_guard` results key. A verdict that reports hazard codes has its own Azure-category
   keys ignored: the policy's mapping is the authority.
3. A guard's `detected` flag counts as at least `low` severity.
4. Per category the policy's rule applies: *hit* when severity >= threshold; a hit is then
   `filtered` when the action is `block`, annotated otherwise. Severity categories always report
   their severity (Azure does, also below the threshold); detection categories report
   `detected` = hit.
5. Blocklist matches (`blocklist:<name>`) are hits; the list's own action applies.
6. A failed guard blocks unless `on_error` (per guard, else `on_guard_error`) is `allow`; the
   failure is reported under the results' `error` key either way.
7. A category is *judged* when a guard that did not fail reported it (after mapping and
   exclusion); only judged categories carry `severity` / `detected` in the results. `scores`
   keeps, per judged category, the highest probability a guard gave it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guards.base import SEVERITY_ORDER, GuardVerdict, Severity, Stage
from guards.content_filter import (
    BLOCKED_PROMPT_MESSAGE,
    DETECTION_CATEGORIES,
    GUARD_DETECTION_KEYS,
    SEVERITY_CATEGORIES,
    CategoryVerdicts,
    choice_results,
    content_filter_error_body,
    prompt_filter_results,
)
from guards.policy import LLAMA_GUARD_CODES, Policy, Rule

BLOCKLIST_PREFIX = "blocklist:"
_DETECTION = frozenset((*DETECTION_CATEGORIES, "indirect_attack", *GUARD_DETECTION_KEYS))
# The guard that reports each `GUARD_DETECTION_KEYS` key (its key is reported when it ran).
_KEY_GUARDS = {"insecure_code": "code_shield", "unsupported_language": "language"}
_SEVERITY = frozenset(SEVERITY_CATEGORIES)
_CODES = frozenset(LLAMA_GUARD_CODES)


@dataclass
class Decision:
    """What the gateway does with one prompt or one completion."""

    stage: Stage
    policy: str
    policy_version: str
    verdicts: CategoryVerdicts
    blocked: bool
    reasons: list[str] = field(default_factory=list)
    # Category (Azure key, unmapped code or `blocklist:<name>`) -> "block" | "annotate", for
    # every category that crossed its threshold.
    hits: dict[str, str] = field(default_factory=dict)
    # Guard -> error message, for guards that failed.
    errors: dict[str, str] = field(default_factory=dict)
    # Guards that ran (failed ones included) with their latency in seconds.
    latencies: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # Judged category -> the highest score (a probability) a guard gave it, and the guards that
    # reported it (for the audit log and the workbench's dry run: which guard decided).
    scores: dict[str, float] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    # The guards' own verdicts, in the order given (for `/v1/moderations`).
    guard_verdicts: list[GuardVerdict] = field(default_factory=list)

    def content_filter_results(self) -> dict[str, Any]:
        """For a choice (`choices[i].content_filter_results`)."""
        return choice_results(self.verdicts)

    def prompt_filter_results(self) -> list[dict[str, Any]]:
        """For the response's `prompt_filter_results` (prompt index 0)."""
        return prompt_filter_results(self.verdicts)

    def error_body(self, message: str | None = None) -> dict[str, Any]:
        """Azure's HTTP 400 body for a blocked prompt."""
        if message is None:
            message = BLOCKED_PROMPT_MESSAGE
            if self.reasons:
                message = f"{message} Reasons: {'; '.join(self.reasons)}."
        return content_filter_error_body(self.verdicts, message)

    def deciders(self) -> list[str]:
        """The guards that made this a block: whose findings hit a blocking rule, or whose
        failure blocked."""
        found = {g for c, a in self.hits.items() if a == "block" for g in self.sources.get(c, [])}
        if self.blocked:
            found.update(self.errors)
        return sorted(found)

    def log_fields(self) -> dict[str, Any]:
        """For a structured log line (no text)."""
        return {
            "stage": self.stage,
            "policy": self.policy,
            "policy_version": self.policy_version,
            "blocked": self.blocked,
            "hits": self.hits,
            "guard_errors": self.errors,
            "skipped_guards": self.skipped,
        }


class _PolicyRules:
    """What `decide` asks of one policy object, resolved on first use: the same for every
    decision under it (a reloaded policy is a new object)."""

    __slots__ = ("policy", "rules", "stage_has_lists")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.rules: dict[str, Rule] = {}
        self.stage_has_lists: dict[Stage, bool] = {}

    def rule(self, category: str) -> Rule:
        rule = self.rules.get(category)
        if rule is None:
            rule = self.rules[category] = self.policy.rule(category)
        return rule

    def has_lists(self, stage: Stage) -> bool:
        has = self.stage_has_lists.get(stage)
        if has is None:
            has = self.stage_has_lists[stage] = bool(self.policy.blocklists_for(stage))
        return has


# Per policy object, bounded like GuardPipelines' cache.
_POLICY_RULES: dict[int, _PolicyRules] = {}
_POLICY_RULES_MAX = 64


def _rules_of(policy: Policy) -> _PolicyRules:
    rules = _POLICY_RULES.get(id(policy))
    if rules is None or rules.policy is not policy:
        if len(_POLICY_RULES) >= _POLICY_RULES_MAX:
            _POLICY_RULES.clear()
        rules = _POLICY_RULES[id(policy)] = _PolicyRules(policy)
    return rules


def _max_severity(current: Severity | None, new: Severity) -> Severity:
    if current is None or SEVERITY_ORDER[new] > SEVERITY_ORDER[current]:
        return new
    return current


def decide(
    policy: Policy,
    stage: Stage,
    verdicts: Sequence[GuardVerdict],
    *,
    ran: Iterable[str] | None = None,
    skipped: Iterable[str] = (),
    assume_judged: Iterable[str] = (),
) -> Decision:
    """The decision for one text. `ran` names the guards that were run (default: those with a
    verdict); it decides whether the optional `llama_guard` key is reported. `assume_judged`
    adds categories to the judged ones (a stage's coverage, for a decision made before its
    guards ran on any text: nothing, so far, is the judgement)."""
    ran_names = set(ran) if ran is not None else {v.guard for v in verdicts}
    rules = _rules_of(policy)
    severities: dict[str, Severity] = {}
    sources: dict[str, set[str]] = {}
    scores: dict[str, float] = {}
    blocklist_matches: dict[str, set[str]] = {}
    errors: dict[str, str] = {}
    latencies: dict[str, float] = {}
    key_details: dict[str, dict[str, Any]] = {}

    def note(category: str, severity: Severity, guard: str, score: float) -> None:
        severities[category] = _max_severity(severities.get(category), severity)
        sources.setdefault(category, set()).add(guard)
        scores[category] = max(scores.get(category, 0.0), float(score))

    for verdict in verdicts:
        latencies[verdict.guard] = verdict.latency_s
        if verdict.failed:
            errors[verdict.guard] = verdict.error or "failed"
            continue
        has_codes = any(key in _CODES for key in verdict.categories)
        for key in GUARD_DETECTION_KEYS:
            if key in verdict.categories and isinstance(verdict.details.get(key), dict):
                key_details[key] = verdict.details[key]
        for key, cat in verdict.categories.items():
            severity: Severity = cat.severity
            if cat.detected and severity == "safe":
                severity = "low"
            if key.startswith(BLOCKLIST_PREFIX):
                if cat.detected or severity != "safe":
                    blocklist_matches.setdefault(key[len(BLOCKLIST_PREFIX) :], set()).add(
                        verdict.guard
                    )
                continue
            if policy.is_excluded(key):
                continue
            if key in _CODES:
                target = policy.llama_guard_target(key)
                if target is None:
                    note(key, severity, verdict.guard, cat.score)
                elif not policy.is_excluded(target):
                    note(target, severity, verdict.guard, cat.score)
                continue
            if key in _SEVERITY:
                if not has_codes:
                    note(key, severity, verdict.guard, cat.score)
                continue
            if key in _DETECTION:
                note(key, severity, verdict.guard, cat.score)
            # Any other key is not a category this gateway reports; it is ignored.

    result = CategoryVerdicts()
    result.judged = set(severities) | {c for c in assume_judged if not policy.is_excluded(c)}
    hits: dict[str, str] = {}
    reasons: list[str] = []
    blocked = False

    for category, severity in sorted(severities.items()):
        rule = rules.rule(category)
        hit = severity != "safe" and rule.hit(severity)
        if category in _SEVERITY:
            result.severities[category] = severity
        elif category in _DETECTION:
            result.detected[category] = hit
        if not hit:
            continue
        hits[category] = rule.action
        guards = ", ".join(sorted(sources.get(category, ())))
        why = key_details.get(category, {}).get("reason")
        if why:
            guards = f"{guards}: {why}"
        if category in _CODES:
            result.llama_guard_codes[category] = rule.action == "block"
        if rule.action == "block":
            blocked = True
            if category not in _CODES:
                result.filtered.add(category)
            reasons.append(f"{category} ({severity} >= {rule.threshold}, {guards})")

    for name, guards_seen in sorted(blocklist_matches.items()):
        settings = policy.blocklist(name)
        # A match from a list this policy does not define (a guard's own list) annotates.
        action = settings.action if settings is not None else "annotate"
        hits[BLOCKLIST_PREFIX + name] = action
        scores[BLOCKLIST_PREFIX + name] = 1.0
        sources[BLOCKLIST_PREFIX + name] = set(guards_seen)
        result.blocklists[name] = action == "block"
        if action == "block":
            blocked = True
            reasons.append(f"blocklist {name} ({', '.join(sorted(guards_seen))})")

    for guard, message in sorted(errors.items()):
        result.errors.append(f"{guard}: {message}")
        if policy.on_error_for(guard) == "block":
            blocked = True
            reasons.append(f"guard {guard} failed: {message}")

    if stage == "input":
        result.report.add("indirect_attack")
    if rules.has_lists(stage):
        result.report.add("custom_blocklists")
    if "llama_guard" in ran_names:
        result.report.add("llama_guard")
    for key, guard in _KEY_GUARDS.items():
        if guard in ran_names and not policy.is_excluded(key):
            result.report.add(key)
            fields: dict[str, Any] = {}
            if key in severities and key == "insecure_code" and severities[key] != "safe":
                fields["severity"] = severities[key]
            details = {k: v for k, v in key_details.get(key, {}).items() if k != "reason"}
            if details:
                fields["details"] = details
            result.key_fields[key] = fields

    return Decision(
        stage=stage,
        policy=policy.name or "",
        policy_version=policy.version,
        verdicts=result,
        blocked=blocked,
        reasons=reasons,
        hits=hits,
        errors=errors,
        latencies=latencies,
        skipped=list(skipped),
        scores=scores,
        guard_verdicts=list(verdicts),
        sources={category: sorted(guards) for category, guards in sources.items()},
    )
