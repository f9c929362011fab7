"""Azure-style content-filter results.

One builder makes `content_filter_results` (per choice) and `prompt_filter_results` (per
prompt). Until guards run, every category is reported safe by this same code; the guards fill
`CategoryVerdicts` later and nothing else changes for the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["safe", "low", "medium", "high"]

SEVERITY_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
DETECTION_CATEGORIES = ("jailbreak", "profanity")


@dataclass
class CategoryVerdicts:
    """What the guards decided for one text (a prompt or a choice)."""

    severities: dict[str, Severity] = field(default_factory=dict)
    detected: dict[str, bool] = field(default_factory=dict)
    filtered: set[str] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in SEVERITY_CATEGORIES:
            out[name] = {
                "filtered": name in self.filtered,
                "severity": self.severities.get(name, "safe"),
            }
        for name in DETECTION_CATEGORIES:
            out[name] = {
                "filtered": name in self.filtered,
                "detected": self.detected.get(name, False),
            }
        out.update(self.extra)
        return out


def choice_results(verdicts: CategoryVerdicts | None = None) -> dict[str, Any]:
    return (verdicts or CategoryVerdicts()).results()


def prompt_filter_results(verdicts: CategoryVerdicts | None = None) -> list[dict[str, Any]]:
    return [{"prompt_index": 0, "content_filter_results": choice_results(verdicts)}]
