"""The gateway's side of the guards: built once at start-up, asked per request.

`GuardServices` holds the policy store (hot-reloaded files), the guard registry (embedded guards
always; Prompt Guard and Llama Guard when their weights are configured) and one pipeline per
policy version. `ContentFiltered` is Azure's 400 for a prompt that the input policy blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from gateway.errors import GatewayError, ServiceUnavailable
from gateway.settings import Settings
from guards.base import Guard
from guards.pipeline import GuardPipeline, GuardPipelines
from guards.policy import Policy
from guards.policy_store import PolicyNotFound, PolicyStore
from guards.registry import build_guards

log = structlog.get_logger(__name__)


class ContentFiltered(GatewayError):
    """400 with Azure's body: `type` null, `code` content_filter, `param` prompt, innererror."""

    status_code = 400
    error_type = None
    code = "content_filter"

    def __init__(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(str(body["error"].get("message", "")), param="prompt", headers=headers)
        self._body = body

    def envelope(self) -> dict[str, Any]:
        return self._body


def policy_header(policy: Policy) -> str:
    """The `x-policy` response header: the policy's name and version."""
    return f"{policy.name}; version={policy.version}"


@dataclass
class GuardServices:
    store: PolicyStore
    pipelines: GuardPipelines
    guards: dict[str, Guard]

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
        return cls(store=store, pipelines=GuardPipelines(guards, registry), guards=guards)

    async def stop(self) -> None:
        await self.store.stop()
        for guard in self.guards.values():
            closer = getattr(guard, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    result = closer()
                    if asyncio.iscoroutine(result):
                        await result

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
