"""A chat request as `ChatService.prepare` leaves it: validated, routed, counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from gateway.audit import AuditContext
from gateway.protocol import ChatCompletionRequest
from gateway.token_ledger import TokenLedger
from gateway.wire_shapes import PromptFilterResult
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.policy import Policy
from model.engine import ChatTurn, Engine, EngineRequest


@dataclass
class PreparedChat:
    """A validated request, ready for the engine.

    Set later: `audit_context` (by the route, once the key is known), `input_decision` (by the
    input check); its tokens are counted in `tokens` as the answer is generated."""

    request: ChatCompletionRequest
    completion_id: str
    created: int
    model_id: str
    engine: Engine
    engine_requests: list[EngineRequest]  # one per choice
    turns: tuple[ChatTurn, ...]
    policy: Policy
    pipeline: GuardPipeline
    tokens: TokenLedger
    started: float  # perf_counter at intake (time to first token is measured from it)
    input_decision: Decision | None = None
    audit_context: AuditContext | None = None

    def prompt_filter_results(self) -> list[PromptFilterResult]:
        decision = self.input_decision
        if decision is None:
            decision = self.pipeline.safe_decision("input")
        # Built by guards.content_filter (which does not import the gateway) in this shape.
        return cast(list[PromptFilterResult], decision.prompt_filter_results())
