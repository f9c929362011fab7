"""The workbench's evaluate: lines run through the guards in batches, a few at a time, with
each line's decision in its own place (mixed stages), the same as line by line."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from gateway import dry_run
from guards.base import Guard, GuardInput, GuardVerdict
from guards.pipeline import GuardPipeline
from guards.policy_cli import EvalLine, guard_input
from guards.policy_loader import load_policy
from guards.registry import build_guards

POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


class Counting(Guard):
    """A real guard, with its calls and the most calls in flight at once counted."""

    def __init__(self, guard: Guard) -> None:
        self.inner = guard
        self.name = guard.name
        self.stages = guard.stages
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # let other batches start, if they may
            return await self.inner.check(items)
        finally:
            self.in_flight -= 1


def _lines(count: int) -> list[EvalLine]:
    texts = ["What a lovely day.", "this fucking printer", "Please repeat GATEWAY-CANARY-BLOCK"]
    return [
        EvalLine(
            text=texts[i % 3],
            expected=set(),
            stage="output" if i % 4 == 0 else "input",
            prompt="Say something" if i % 4 == 0 else None,
            line=i + 1,
        )
        for i in range(count)
    ]


async def test_evaluate_batches_lines_and_keeps_each_decision_in_place() -> None:
    policy = load_policy(POLICY)
    real = build_guards(device="cpu")
    profanity = Counting(real["profanity"])
    guards: dict[str, Guard] = {**real, "profanity": profanity}
    lines = _lines(100)
    got = await dry_run.predictions(policy, guards, lines, {})
    pipeline = GuardPipeline(policy, real)
    expected = []
    for line in lines:
        (decision,) = await pipeline.run(line.stage, [guard_input(line, None)])
        expected.append((set(decision.hits), decision.blocked))
    assert got == expected
    assert any(blocked for _, blocked in got) and not all(blocked for _, blocked in got)
    # 75 input lines and 25 output lines: ceil(75/16) + ceil(25/16) guard calls, not 100.
    assert profanity.calls == 5 + 2
    assert 1 < profanity.most_in_flight <= dry_run.EVAL_CONCURRENCY


async def test_dry_runs_log_skipped_guards_at_debug_only() -> None:
    import logging

    import structlog

    # Debug lines must reach the capture whatever logging level an earlier test configured.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        await _check_dry_run_logs()
    finally:
        structlog.configure(**saved)


async def _check_dry_run_logs() -> None:
    from structlog.testing import capture_logs

    policy = load_policy(POLICY)
    guards = build_guards(device="cpu")  # no weights: the optional weight guards are skipped
    with capture_logs() as logs:
        for _ in range(3):
            result = await dry_run.dry_run(policy, guards, "hello", answer="hi")
        await dry_run.predictions(policy, guards, _lines(3), {})
    assert result["skipped_guards"], "the policy skips no guard here: nothing is tested"
    skipped = [e for e in logs if e["event"] == "optional_guards_skipped"]
    assert skipped and {e["log_level"] for e in skipped} == {"debug"}
    with capture_logs() as logs:
        GuardPipeline(policy, guards)  # the request path's pipelines still say it at info
    assert {e["log_level"] for e in logs if e["event"] == "optional_guards_skipped"} == {"info"}


async def test_dry_run_decided_by_names_a_guard_whose_failure_blocked() -> None:
    from guards.policy_loader import parse_policy

    # llama_guard is required here but has no weights: it fails, and the policy blocks.
    policy = parse_policy(
        "name: fails-closed\nversion: '1'\nguards:\n"
        "  blocklist: {stages: [input]}\n"
        "  llama_guard: {stages: [input], on_error: block}\n"
    )
    result = await dry_run.dry_run(policy, build_guards(device="cpu"), "hello")
    assert result["response"]["status"] == 400
    assert "llama_guard" in result["input"]["guard_errors"]
    assert result["input"]["decided_by"] == ["llama_guard"]  # as the audit log says
