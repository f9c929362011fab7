"""Running a policy's guards for a stage: concurrently, each under its timeout, never raising.

`GuardPipeline(policy, guards, metrics)` runs one policy; `GuardPipelines(guards, metrics)`
keeps one per policy version (`pipelines.for_policy(store.get(name))` per request: a policy can
be hot-reloaded between requests). `await pipeline.run(stage, items)` returns one `Decision` per
item. Guards come from a registry (`dict[str, Guard]`) of what this process has:

- `blocklist` is built from the policy itself when the registry has none (the lists are the
  policy's); a registry guard with a `for_policy(policy)` method is bound to the policy the same
  way (Llama Guard can take `policy.llama_guard_excluded_codes()` there);
- a guard the policy names but the registry lacks is *skipped* with a log line when the policy
  marks it `optional`, else it fails (and `on_guard_error` decides, block by default);
- an exception, a timeout or a wrong number of verdicts becomes a verdict with `error` set.

Metrics (on the `CollectorRegistry` given; one `GuardMetrics` per registry):
`gateway_guard_latency_seconds{guard,stage}`, `gateway_guard_errors_total{guard,stage,kind}`
(kind: timeout, exception, unavailable, or item when a guard failed one item of a batch),
`gateway_guard_verdicts_total{stage,category,action}` (each category that crossed its
threshold), `gateway_guard_decisions_total{stage,policy,outcome}`,
`gateway_policy_reloads_total{policy}`, `gateway_policy_reload_errors_total{file}`.
"""

from __future__ import annotations

import asyncio
import time
import types
import weakref
from collections.abc import Awaitable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from guards.base import Guard, GuardInput, GuardVerdict, Stage
from guards.blocklist import BlocklistGuard
from guards.coverage import stage_coverage
from guards.decision import Decision, decide
from guards.policy import Policy

log = structlog.get_logger("guards")

R = TypeVar("R")

GUARD_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, GuardMetrics] = weakref.WeakKeyDictionary()


class GuardMetrics:
    """The guard and policy metrics on one registry. Use `GuardMetrics.on(registry)`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.latency = Histogram(
            "gateway_guard_latency_seconds",
            "Time a guard took for one batch, by guard and stage",
            ["guard", "stage"],
            buckets=GUARD_LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "gateway_guard_errors",
            "Guard failures by guard, stage and kind (timeout, exception, unavailable, item)",
            ["guard", "stage", "kind"],
            registry=registry,
        )
        self.verdicts = Counter(
            "gateway_guard_verdicts",
            "Categories that crossed their threshold, by stage, category and action",
            ["stage", "category", "action"],
            registry=registry,
        )
        self.decisions = Counter(
            "gateway_guard_decisions",
            "Guard decisions by stage, policy and outcome (blocked, allowed)",
            ["stage", "policy", "outcome"],
            registry=registry,
        )
        self.reloads = Counter(
            "gateway_policy_reloads",
            "Policies (re)loaded from their files",
            ["policy"],
            registry=registry,
        )
        self.reload_errors = Counter(
            "gateway_policy_reload_errors",
            "Policy files that failed to load (the last good version stays)",
            ["file"],
            registry=registry,
        )

    @classmethod
    def on(cls, registry: CollectorRegistry | GuardMetrics | None) -> GuardMetrics:
        if isinstance(registry, GuardMetrics):
            return registry
        if registry is None:
            registry = CollectorRegistry()
        existing = _METRICS.get(registry)
        if existing is None:
            existing = cls(registry)
            _METRICS[registry] = existing
        return existing


@dataclass(frozen=True)
class _Planned:
    name: str
    guard: Guard | None  # None: required but not available
    timeout_s: float
    latency: Any  # the latency histogram's child for this guard and stage, looked up once


class _Unavailable(Exception):
    pass


@types.coroutine
def _resume(check: Coroutine[Any, Any, R], yielded: Any) -> Generator[Any, Any, R]:
    """Go on with a coroutine whose first `send` gave `yielded`, as `await` would have: what
    the task sends or throws in goes on to it."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            check.close()
            raise
        except BaseException as exc:  # cancellation included: the check handles it
            try:
                yielded = check.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = check.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _awaited(awaitable: Awaitable[R]) -> R:
    return await awaitable


class GuardPipeline:
    def __init__(
        self,
        policy: Policy,
        guards: Mapping[str, Guard],
        metrics: CollectorRegistry | GuardMetrics | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        """`quiet`: a throwaway pipeline (a dry run) logs what it skips at debug, not info."""
        self.policy = policy
        self.metrics = GuardMetrics.on(metrics)
        self._plans: dict[Stage, list[_Planned]] = {}
        self._skipped: dict[Stage, list[str]] = {}
        # What the available guards judge per stage (see guards.coverage).
        self._coverage = {s: stage_coverage(policy, guards, s) for s in ("input", "output")}
        bound: dict[str, Guard | None] = {}
        for stage in ("input", "output"):
            plans: list[_Planned] = []
            skipped: list[str] = []
            for name, settings in policy.guards_for(stage):
                if name not in bound:
                    bound[name] = self._bind(name, guards.get(name))
                guard = bound[name]
                if guard is not None and stage not in guard.stages:
                    log.warning("guard_stage_unsupported", guard=name, stage=stage)
                    guard = None
                if guard is None and settings.optional:
                    skipped.append(name)
                    continue
                latency = self.metrics.latency.labels(name, stage)
                plans.append(_Planned(name, guard, policy.timeout_for(name), latency))
            self._plans[stage] = plans
            self._skipped[stage] = skipped
        # A streamed piece skips the guards that only judge whole answers: chosen once here.
        self._piece_plans = {
            stage: [p for p in plans if p.guard is None or not p.guard.whole_answer_only]
            for stage, plans in self._plans.items()
        }
        # A stage with no guard decides the same for every text: built once, shared (a
        # Decision is not changed after `decide`), its counter child looked up once.
        self._unguarded: dict[Stage, tuple[Decision, Counter]] = {}
        self._decision_counters: dict[tuple[Stage, str], Any] = {}  # (stage, outcome) -> child
        for stage in self._plans:
            if not self._plans[stage]:
                decision = self.safe_decision(stage)
                outcome = "blocked" if decision.blocked else "allowed"
                child = self.metrics.decisions.labels(stage, policy.name, outcome)
                self._unguarded[stage] = (decision, child)
        for stage, names in self._skipped.items():
            if names:
                (log.debug if quiet else log.info)(
                    "optional_guards_skipped",
                    policy=policy.name,
                    stage=stage,
                    guards=names,
                    reason="not configured (no weights)",
                )

    def _bind(self, name: str, guard: Guard | None) -> Guard | None:
        if guard is None and name == "blocklist":
            return BlocklistGuard.from_policy(self.policy)
        return guard.for_policy(self.policy) if guard is not None else None

    def guards_for(self, stage: Stage) -> list[str]:
        """Names of the guards that run (or fail as unavailable) at this stage."""
        return [p.name for p in self._plans[stage]]

    def skipped(self, stage: Stage) -> list[str]:
        return list(self._skipped[stage])

    def safe_decision(self, stage: Stage) -> Decision:
        """A decision with nothing found, with the same result keys (and judged categories) as
        a real one at this stage (for streamed chunks sent before the first output check)."""
        return decide(
            self.policy,
            stage,
            [],
            ran=self.guards_for(stage),
            skipped=self._skipped[stage],
            assume_judged=self._coverage[stage] if self._plans.get(stage) else (),
        )

    async def run(
        self, stage: Stage, items: Sequence[GuardInput], *, piece: bool = False
    ) -> list[Decision]:
        """Decisions for `items`. `piece`: the items are pieces of a streamed answer (with their
        context), not whole answers; guards whose verdict only means something on a whole
        answer (`whole_answer_only`, e.g. its language) sit these out and judge the final,
        whole-answer check."""
        if not items:
            return []
        if any(item.stage != stage for item in items):
            raise ValueError(f"every item must be at stage {stage!r}")
        unguarded = self._unguarded.get(stage)
        if unguarded is not None:  # the guards-off hot path: no gather, no decide
            decision, counter = unguarded
            counter.inc(len(items))
            return [decision] * len(items)
        plans = self._piece_plans[stage] if piece else self._plans[stage]
        # Every guard is started before any is waited for (they run concurrently); one that
        # finishes without waiting (the in-process guards on short texts) costs no task, no
        # timer and no turn of the event loop.
        begun: list[list[GuardVerdict] | Coroutine[Any, Any, list[GuardVerdict]]] = []
        try:
            for plan in plans:
                begun.append(self._start(plan, stage, items))
        except BaseException:
            for check in begun:
                if not isinstance(check, list):
                    check.close()
            raise
        waits = [check for check in begun if not isinstance(check, list)]
        waited = iter(await asyncio.gather(*waits) if waits else ())
        results = [check if isinstance(check, list) else next(waited) for check in begun]
        ran, skipped = [p.name for p in plans], self._skipped[stage]
        decisions = []
        for i in range(len(items)):
            verdicts = [per_guard[i] for per_guard in results]
            decision = decide(self.policy, stage, verdicts, ran=ran, skipped=skipped)
            self._record(decision)
            decisions.append(decision)
        return decisions

    def _start(
        self, plan: _Planned, stage: Stage, items: Sequence[GuardInput]
    ) -> list[GuardVerdict] | Coroutine[Any, Any, list[GuardVerdict]]:
        """Run a guard's check up to its first wait: its verdicts when it finished, else a
        coroutine that finishes it under the guard's timeout (counted from now)."""
        started = time.perf_counter()
        if plan.guard is None:
            error = _Unavailable("guard not available (not configured)")
            return self._failed(plan, stage, items, started, "unavailable", error)
        deadline = asyncio.get_running_loop().time() + plan.timeout_s
        try:
            check = plan.guard.check(items)
            if not isinstance(check, Coroutine):  # an awaitable of another kind
                check = _awaited(check)
            try:
                yielded = check.send(None)
            except StopIteration as stop:
                return self._verdicts(plan, stage, items, stop.value, started)
        except Exception as exc:  # a guard failure must never reach the request
            return self._failed(plan, stage, items, started, "exception", exc)
        return self._wait(plan, stage, items, check, yielded, deadline, started)

    async def _wait(
        self,
        plan: _Planned,
        stage: Stage,
        items: Sequence[GuardInput],
        check: Coroutine[Any, Any, list[GuardVerdict]],
        yielded: Any,
        deadline: float,
        started: float,
    ) -> list[GuardVerdict]:
        """The rest of a check that waits: under its deadline, failures as verdicts."""
        scope = asyncio.timeout_at(deadline)
        try:
            try:
                async with scope:
                    verdicts = await _resume(check, yielded)
            except TimeoutError:
                if not scope.expired():
                    raise  # the guard's own TimeoutError, not ours
                error = TimeoutError(f"timed out after {plan.timeout_s:g}s")
                return self._failed(plan, stage, items, started, "timeout", error)
            return self._verdicts(plan, stage, items, verdicts, started)
        except Exception as exc:  # a guard failure must never reach the request
            return self._failed(plan, stage, items, started, "exception", exc)

    def _verdicts(
        self,
        plan: _Planned,
        stage: Stage,
        items: Sequence[GuardInput],
        verdicts: list[GuardVerdict],
        started: float,
    ) -> list[GuardVerdict]:
        if len(verdicts) != len(items):
            error = RuntimeError(f"returned {len(verdicts)} verdicts for {len(items)} inputs")
            return self._failed(plan, stage, items, started, "exception", error)
        elapsed = time.perf_counter() - started
        plan.latency.observe(elapsed)
        for verdict in verdicts:
            if not verdict.latency_s:
                verdict.latency_s = elapsed
            if verdict.failed:  # the guard failed on this item only
                self.metrics.errors.labels(plan.name, stage, "item").inc()
        return list(verdicts)

    def _failed(
        self,
        plan: _Planned,
        stage: Stage,
        items: Sequence[GuardInput],
        started: float,
        kind: str,
        exc: Exception,
    ) -> list[GuardVerdict]:
        elapsed = time.perf_counter() - started
        message = str(exc) or type(exc).__name__
        self.metrics.errors.labels(plan.name, stage, kind).inc()
        log.warning(
            "guard_failed",
            guard=plan.name,
            stage=stage,
            kind=kind,
            error=message,
            policy=self.policy.name,
        )
        return [GuardVerdict(guard=plan.name, latency_s=elapsed, error=message) for _ in items]

    def _record(self, decision: Decision) -> None:
        for category, action in decision.hits.items():
            self.metrics.verdicts.labels(decision.stage, category, action).inc()
        outcome = "blocked" if decision.blocked else "allowed"
        counter = self._decision_counters.get((decision.stage, outcome))
        if counter is None:
            counter = self.metrics.decisions.labels(decision.stage, decision.policy, outcome)
            self._decision_counters[(decision.stage, outcome)] = counter
        counter.inc()


class GuardPipelines:
    """One `GuardPipeline` per policy version, built on first use (guards are bound to the
    policy once, and skipped guards are logged once). A reloaded policy is a new `Policy`
    object, so it gets a new pipeline; old ones are dropped when the cache grows."""

    def __init__(
        self,
        guards: Mapping[str, Guard],
        metrics: CollectorRegistry | GuardMetrics | None = None,
        *,
        max_entries: int = 64,
    ) -> None:
        self.guards = dict(guards)
        self.metrics = GuardMetrics.on(metrics)
        self.max_entries = max_entries
        self._cache: dict[int, tuple[Policy, GuardPipeline]] = {}

    def for_policy(self, policy: Policy) -> GuardPipeline:
        hit = self._cache.get(id(policy))
        if hit is not None and hit[0] is policy:
            return hit[1]
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        pipeline = GuardPipeline(policy, self.guards, self.metrics)
        self._cache[id(policy)] = (policy, pipeline)
        return pipeline


def log_decision(decision: Decision, **extra: Any) -> None:
    """One structured log line for a decision that found something (no text is logged)."""
    if decision.hits or decision.errors:
        log.info("guard_decision", **decision.log_fields(), **extra)
