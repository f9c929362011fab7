"""From one input's guard decision to an OpenAI moderation result (the 13 omni categories).

The mapping (also in the README). An omni category is judged by the sources listed; its score
is the highest probability a source got, its flag is whether a source crossed its threshold
under the policy (the same rule that blocks or annotates chat traffic):

| omni category            | judged by                                            |
| ------------------------ | ---------------------------------------------------- |
| harassment               | (no guard: never judged)                             |
| harassment/threatening   | (no guard: never judged)                             |
| hate                     | Llama Guard S10 Hate; a guard reporting Azure `hate` |
| hate/threatening         | (no guard: never judged)                             |
| illicit                  | Llama Guard S2 Non-Violent Crimes                    |
| illicit/violent          | Llama Guard S1 Violent Crimes, S9 Indiscriminate Weapons |
| self-harm                | Llama Guard S11 Self-Harm; Azure `self_harm`         |
| self-harm/intent         | (no guard: never judged)                             |
| self-harm/instructions   | (no guard: never judged)                             |
| sexual                   | Llama Guard S3 Sex Crimes, S12 Sexual Content; Azure `sexual` |
| sexual/minors            | Llama Guard S4 Child Exploitation                    |
| violence                 | Llama Guard S1 Violent Crimes; Azure `violence`      |
| violence/graphic         | (no guard: never judged)                             |

Llama Guard does not tell threats, intent or instructions apart, so those sub-categories are not
judged rather than copied from their parent. Everything without an omni counterpart goes under
`gateway_categories` (never into a made-up omni key): Llama Guard S5-S8, S13, S14 (by code),
`jailbreak`, `indirect_attack`, `profanity`, and `custom_blocklists` (the lists that matched).
A category nobody judged scores 0, is not flagged, and is listed in no
`category_applied_input_types`; `image` is listed only when a guard really looked at an image
(Llama Guard 3 11B-Vision, which sees the input's image for every hazard category).
"""

from __future__ import annotations

from typing import Any

from guards.base import SEVERITY_ORDER, GuardVerdict
from guards.decision import BLOCKLIST_PREFIX, Decision
from guards.policy import LLAMA_GUARD_CODES, Policy

OMNI_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
# Llama Guard hazard code -> the omni categories it judges.
CODE_TO_OMNI: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"),
    "S2": ("illicit",),
    "S3": ("sexual",),
    "S4": ("sexual/minors",),
    "S9": ("illicit/violent",),
    "S10": ("hate",),
    "S11": ("self-harm",),
    "S12": ("sexual",),
}
# A guard that reports Azure severity categories directly (no hazard codes).
AZURE_TO_OMNI: dict[str, str] = {
    "hate": "hate",
    "self_harm": "self-harm",
    "sexual": "sexual",
    "violence": "violence",
}
GATEWAY_DETECTIONS = ("jailbreak", "indirect_attack", "profanity")


class _Result:
    def __init__(self) -> None:
        self.scores: dict[str, float] = dict.fromkeys(OMNI_CATEGORIES, 0.0)
        self.flags: dict[str, bool] = dict.fromkeys(OMNI_CATEGORIES, False)
        self.types: dict[str, set[str]] = {c: set() for c in OMNI_CATEGORIES}
        self.gateway: dict[str, dict[str, Any]] = {}

    def add(
        self, target: str, score: float, flagged: bool, types: set[str], omni: bool = True
    ) -> None:
        if omni:
            self.scores[target] = max(self.scores[target], score)
            self.flags[target] = self.flags[target] or flagged
            self.types[target] |= types
            return
        entry = self.gateway.setdefault(target, {"flagged": False, "score": 0.0})
        entry["flagged"] = bool(entry["flagged"] or flagged)
        entry["score"] = max(float(entry["score"]), score)


def _hit(policy: Policy, category: str, severity: str, detected: bool) -> bool:
    """Whether `category` at this severity crosses the policy's threshold (as `decide` rules)."""
    if detected and severity == "safe":
        severity = "low"
    return (
        severity != "safe"
        and SEVERITY_ORDER.get(severity, 0) >= SEVERITY_ORDER[policy.rule(category).threshold]
    )


def _input_types(verdict: GuardVerdict, has_text: bool) -> set[str]:
    types = {"text"} if has_text else set()
    if verdict.details.get("image"):
        types.add("image")
    return types


def moderation_result(policy: Policy, decision: Decision, *, has_text: bool) -> dict[str, Any]:
    """One entry of `results` (see the module doc), with the Azure-style results of the same
    judgement under `content_filter_results`."""
    result = _Result()
    for verdict in decision.guard_verdicts:
        if verdict.failed:
            continue
        types = _input_types(verdict, has_text)
        has_codes = any(key in LLAMA_GUARD_CODES for key in verdict.categories)
        for key, cat in verdict.categories.items():
            if key.startswith(BLOCKLIST_PREFIX) or policy.is_excluded(key):
                continue
            if key in LLAMA_GUARD_CODES:
                mapped = policy.llama_guard_target(key)
                if mapped is not None and policy.is_excluded(mapped):
                    continue
                flagged = _hit(policy, mapped or key, cat.severity, cat.detected)
                omni = CODE_TO_OMNI.get(key, ())
                for target in omni:
                    result.add(target, cat.score, flagged, types)
                if not omni:
                    result.add(key, cat.score, flagged, types, omni=False)
            elif key in AZURE_TO_OMNI and not has_codes:
                flagged = _hit(policy, key, cat.severity, cat.detected)
                result.add(AZURE_TO_OMNI[key], cat.score, flagged, types)
            elif key in GATEWAY_DETECTIONS:
                flagged = _hit(policy, key, cat.severity, cat.detected)
                result.add(key, cat.score, flagged, types, omni=False)
    for name in decision.verdicts.blocklists:  # a matched list is a hit whatever its action
        result.gateway[f"custom_blocklists/{name}"] = {"flagged": True, "score": 1.0}
    applied = {c: sorted(result.types[c]) for c in OMNI_CATEGORIES}
    out: dict[str, Any] = {
        "flagged": bool(decision.hits) or decision.blocked,
        "categories": result.flags,
        "category_scores": result.scores,
        "category_applied_input_types": applied,
        "gateway_categories": dict(sorted(result.gateway.items())),
        "blocked": decision.blocked,
        "content_filter_results": decision.content_filter_results(),
    }
    if decision.errors:
        out["errors"] = [f"{g}: {m}" for g, m in sorted(decision.errors.items())]
    return out
