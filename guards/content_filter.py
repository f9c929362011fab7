"""Azure-style content-filter results.

One builder makes `content_filter_results` (per choice) and `prompt_filter_results` (per
prompt), always with the six keys of the contract. A category is reported with `severity` (the
four harm keys) or `detected` (the detection keys) only when a guard of the effective policy
really judged it (`CategoryVerdicts.judged`); a category nobody judged carries only
`{"filtered": false}` (the seed's own shape), never a claimed `safe`. With no arguments nothing
was judged. `guards.decision.decide` fills `CategoryVerdicts` from the guards' verdicts under a
policy, and may switch on the optional keys:

- `indirect_attack` (`{filtered, detected}`, on prompts);
- `custom_blocklists` (`{filtered, details: [{filtered, id}]}`, Azure's shape, when the policy
  has blocklists on that stage; `details` lists the lists that matched);
- `llama_guard` (`{filtered, detected, categories: ["S2", ...]}`: the Llama Guard hazard codes
  that have no Azure counterpart under the policy's mapping and crossed their threshold);
- `error` (`{code: "guard_error", message}`: a guard failed or timed out);
- `insecure_code` (`{filtered, detected, severity?, details?}`, on choices, when Code Shield
  ran) and `unsupported_language` (`{filtered, detected, details: {language, confidence}}`, when
  the language guard ran): `GUARD_DETECTION_KEYS`, with extra fields from `key_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guards.base import Severity

SEVERITY_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
DETECTION_CATEGORIES = ("jailbreak", "profanity")
OPTIONAL_KEYS = ("indirect_attack", "custom_blocklists", "llama_guard")
# Detection keys of the Code Shield and language guards: reported when their guard ran.
GUARD_DETECTION_KEYS = ("insecure_code", "unsupported_language")

BLOCKED_PROMPT_MESSAGE = (
    "The prompt was filtered due to triggering the gateway's content management policy. "
    "Please modify your prompt and retry."
)


def _code_order(code: str) -> tuple[int, str]:
    digits = code[1:] if code[:1] == "S" else ""
    return (int(digits), code) if digits.isdigit() else (10_000, code)


@dataclass
class CategoryVerdicts:
    """What the guards decided for one text (a prompt or a choice)."""

    severities: dict[str, Severity] = field(default_factory=dict)
    # Categories a guard really judged (only these get `severity` / `detected`).
    judged: set[str] = field(default_factory=set)
    detected: dict[str, bool] = field(default_factory=dict)
    filtered: set[str] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)
    # Optional keys (see the module doc) reported in the results; none by default.
    report: set[str] = field(default_factory=set)
    # Blocklist name -> filtered, for the lists that matched.
    blocklists: dict[str, bool] = field(default_factory=dict)
    # Unmapped Llama Guard code -> filtered, for the codes that crossed their threshold.
    llama_guard_codes: dict[str, bool] = field(default_factory=dict)
    # Messages of guards that failed (reported under `error`).
    errors: list[str] = field(default_factory=list)
    # Extra fields of a `GUARD_DETECTION_KEYS` entry (severity, details).
    key_fields: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def any_filtered(self) -> bool:
        return (
            bool(self.filtered)
            or any(self.blocklists.values())
            or any(self.llama_guard_codes.values())
        )

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in SEVERITY_CATEGORIES:
            if name in self.judged:
                out[name] = {
                    "filtered": name in self.filtered,
                    "severity": self.severities.get(name, "safe"),
                }
            else:
                out[name] = {"filtered": False}
        for name in DETECTION_CATEGORIES:
            out[name] = self._detection(name)
        if "indirect_attack" in self.report:
            out["indirect_attack"] = self._detection("indirect_attack")
        if "custom_blocklists" in self.report or self.blocklists:
            out["custom_blocklists"] = {
                "filtered": any(self.blocklists.values()),
                "details": [
                    {"filtered": filtered, "id": name}
                    for name, filtered in sorted(self.blocklists.items())
                ],
            }
        if "llama_guard" in self.report or self.llama_guard_codes:
            out["llama_guard"] = {
                "filtered": any(self.llama_guard_codes.values()),
                "detected": bool(self.llama_guard_codes),
                "categories": sorted(self.llama_guard_codes, key=_code_order),
            }
        for name in GUARD_DETECTION_KEYS:
            if name in self.report:
                out[name] = {
                    "filtered": name in self.filtered,
                    "detected": self.detected.get(name, False),
                    **self.key_fields.get(name, {}),
                }
        if self.errors:
            out["error"] = {"code": "guard_error", "message": "; ".join(self.errors)}
        out.update(self.extra)
        return out

    def _detection(self, name: str) -> dict[str, bool]:
        if name not in self.judged:
            return {"filtered": False}
        return {"filtered": name in self.filtered, "detected": self.detected.get(name, False)}


def choice_results(verdicts: CategoryVerdicts | None = None) -> dict[str, Any]:
    return (verdicts or CategoryVerdicts()).results()


def prompt_filter_results(verdicts: CategoryVerdicts | None = None) -> list[dict[str, Any]]:
    return [{"prompt_index": 0, "content_filter_results": choice_results(verdicts)}]


def content_filter_error_body(
    verdicts: CategoryVerdicts, message: str = BLOCKED_PROMPT_MESSAGE
) -> dict[str, Any]:
    """Azure's 400 body for a prompt blocked by the input policy (the whole JSON response)."""
    return {
        "error": {
            "message": message,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": verdicts.results(),
            },
        }
    }
