"""The guard interface: one small protocol that every guard implements.

A guard looks at a conversation at a stage (the input prompt, or the output completion with its
prompt) and returns a verdict: per category a score, a severity and a detected flag, plus its
name, its latency, or the error that stopped it. What to *do* with a verdict (block, annotate)
is the policy's business, not the guard's.

Category keys in verdicts:
- Azure severity categories: "hate", "self_harm", "sexual", "violence";
- Azure detection categories: "jailbreak", "indirect_attack", "profanity";
- Llama Guard hazard codes that have no Azure counterpart: "S1".."S14" (the policy maps codes
  onto Azure categories; the guard reports raw codes it found as well);
- blocklists: "blocklist:<name>" with `details["matches"]` listing what matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from model.engine import ChatTurn

if TYPE_CHECKING:
    from guards.policy import Policy

Stage = Literal["input", "output"]
Severity = Literal["safe", "low", "medium", "high"]
SEVERITY_ORDER: dict[str, int] = {"safe": 0, "low": 1, "medium": 2, "high": 3}


def severity_from_score(score: float) -> Severity:
    """A probability-like score in [0, 1] mapped onto Azure's severity levels."""
    if score >= 0.9:
        return "high"
    if score >= 0.7:
        return "medium"
    if score >= 0.5:
        return "low"
    return "safe"


@dataclass(frozen=True)
class GuardInput:
    """What a guard checks. At the output stage `completion` holds the assistant's text."""

    stage: Stage
    messages: tuple[ChatTurn, ...]
    completion: str | None = None

    def last_user_text(self) -> str:
        from model.engine import TextPart

        for turn in reversed(self.messages):
            if turn.role == "user":
                return "\n".join(p.text for p in turn.parts if isinstance(p, TextPart))
        return ""

    def text_to_check(self) -> str:
        """The text under judgement: the completion at output, the prompt's user text at input."""
        if self.stage == "output":
            return self.completion or ""
        from model.engine import TextPart

        return "\n".join(
            p.text
            for turn in self.messages
            if turn.role in ("user", "system", "tool")
            for p in turn.parts
            if isinstance(p, TextPart)
        )


@dataclass(frozen=True)
class CategoryScore:
    score: float
    severity: Severity
    detected: bool


@dataclass
class GuardVerdict:
    guard: str
    categories: dict[str, CategoryScore] = field(default_factory=dict)
    latency_s: float = 0.0
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.error is not None


@runtime_checkable
class Guard(Protocol):
    """A guard checks a batch of inputs and returns one verdict per input, in order.

    Implementations must not raise for bad content; an exception means the guard failed, and
    the caller turns it into a verdict with `error` set (fail closed unless the policy says
    otherwise).

    Guards subclass this protocol explicitly, so that they inherit the defaults of its optional
    capabilities (`for_policy`, `close`, `whole_answer_only`, `judged_categories`) and override
    only those they have.
    """

    name: str
    stages: frozenset[Stage]
    # True for a guard whose verdict only means something on a whole answer (e.g. its
    # language): it sits out the pieces of a streamed answer and judges the final check.
    whole_answer_only: bool = False

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]: ...

    def for_policy(self, policy: Policy) -> Guard:
        """This guard bound to one policy (its lists, its languages); the pipeline calls it once
        per policy version. The default: the guard does not depend on the policy."""
        return self

    def close(self) -> None:
        """Release threads and workers at shutdown; the default has nothing to release."""
        return None

    @property
    def judged_categories(self) -> frozenset[str] | None:
        """The category keys this guard reports in its verdicts, when they depend on how it was
        built (Llama Guard's rendered codes); None: the ones its registry name stands for
        (`guards.coverage`)."""
        return None
