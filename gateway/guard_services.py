"""The gateway's side of the guards: built once at start-up, asked per request.

`GuardServices` holds the policy store (hot-reloaded files), the guard registry (embedded guards
always; Prompt Guard and Llama Guard when their weights are configured) and one pipeline per
policy version. A prompt that the input policy blocks is `gateway.errors.ContentFiltered`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from gateway.audit import AuditContext, AuditLog, AuditText
from gateway.errors import ServiceUnavailable
from gateway.settings import Settings
from guards.base import Guard
from guards.coverage import GUARD_SETTING, cannot_judge, hint, missing_required
from guards.decision import Decision
from guards.pipeline import GuardPipeline, GuardPipelines
from guards.policy import Policy
from guards.policy_store import PolicyNotFound, PolicyStore
from guards.registry import build_guards

log = structlog.get_logger(__name__)


def policy_header(policy: Policy) -> str:
    """The `x-policy` response header: the policy's name and version."""
    return f"{policy.name}; version={policy.version}"


@dataclass
class GuardServices:
    store: PolicyStore
    pipelines: GuardPipelines
    guards: dict[str, Guard]
    audit: AuditLog | None = None

    @classmethod
    async def start(cls, settings: Settings, registry: CollectorRegistry) -> GuardServices:
        store = PolicyStore(settings.policy_dir, default=settings.default_policy, metrics=registry)
        await store.start()
        # Loading classifiers (scikit-learn, model weights) must not block the event loop.
        guards = await asyncio.to_thread(
            build_guards,
            prompt_guard_path=settings.prompt_guard_path,
            llama_guard_path=settings.llama_guard_path,
            device=settings.device,
            code_shield_workers=settings.code_shield_workers,
            code_shield_timeout_s=settings.code_shield_semgrep_timeout_s,
            background_loads=True,
        )
        log.info("guards_ready", guards=sorted(guards), policies=store.names())
        _report_missing_code_shield(store, guards)
        services = cls(store=store, pipelines=GuardPipelines(guards, registry), guards=guards)
        services.log_coverage()
        return services

    def log_coverage(self) -> None:
        """Once at start-up: per policy, the categories nobody can judge, and what to set."""
        for policy in self.store:
            gaps = cannot_judge(policy, self.guards)
            if gaps:
                log.warning(
                    "categories_not_judged",
                    policy=policy.name,
                    categories={c: f"{hint(c)} (stages: {', '.join(s)})" for c, s in gaps.items()},
                )

    def ready(self) -> tuple[bool, str]:
        """For `/readyz`: the default policy is loaded, and every guard a loaded policy
        requires (`optional: false`) is available."""
        ok, why = self.store.ready()
        problems = [] if ok else [why]
        for policy in self.store:
            for name in missing_required(policy, self.guards):
                setting = GUARD_SETTING.get(name)
                how = f" (set {setting})" if setting else ""
                problems.append(
                    f"policy {policy.name!r} requires guard {name!r}, which is not available{how}"
                )
        return (not problems, "; ".join(problems) or "ok")

    def status(self) -> list[dict[str, Any]]:
        """`GET /admin/policies` rows, with the categories each policy cannot judge here."""
        rows = self.store.status()
        for row in rows:
            try:
                policy = self.store.get(row["name"])
            except PolicyNotFound:
                row["cannot_judge"] = None
                continue
            row["cannot_judge"] = cannot_judge(policy, self.guards)
            row["missing_guards"] = missing_required(policy, self.guards)
        return rows

    async def stop(self) -> None:
        await self.store.stop()
        for guard in self.guards.values():
            with contextlib.suppress(Exception):
                guard.close()

    def policy(self, name: str | None) -> Policy:
        """The key's policy (or the default); a key naming a policy that is not loaded fails
        closed rather than falling back to something weaker."""
        try:
            return self.store.get(name)
        except PolicyNotFound:
            raise ServiceUnavailable(
                f"The policy '{name}' assigned to this key is not loaded.", code="policy_missing"
            ) from None

    def pipeline(self, policy: Policy) -> GuardPipeline:
        return self.pipelines.for_policy(policy)

    def audit_decision(
        self,
        decision: Decision,
        policy: Policy,
        context: AuditContext | None,
        text: AuditText = None,
    ) -> None:
        """Queue a decision for the audit log (nothing happens on the request path). `text`
        may be a zero-argument callable: it is called only when the policy keeps a sample."""
        if self.audit is not None:
            self.audit.record(decision, policy, context, text)


def _report_missing_code_shield(store: PolicyStore, guards: dict[str, Guard]) -> None:
    """A clear start-up line for each policy that asks for Code Shield when it is missing:
    an optional one is skipped, a required one fails closed (every completion is withheld)."""
    if "code_shield" in guards:
        return
    for name in store.names():
        with contextlib.suppress(PolicyNotFound):
            settings = store.get(name).guards.get("code_shield")
            if settings is None:
                continue
            log.warning(
                "code_shield_missing",
                policy=name,
                effect="skipped" if settings.optional else "completions withheld (fail closed)",
                fix="pip install '.[codeshield]'",
            )
