"""Model routes at run time: which engine serves which model name.

`ModelRouter` resolves a requested name (or alias) to its route, and builds and owns the routes'
engines; the routes file it is built from is `gateway.model_routes_file` (see docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.model_routes_file import (
    BaseRoute,
    EngineKind,
    LiteLLMRoute,
    LocalRoute,
    RemoteRoute,
    RoutesFile,
    RoutesFileError,
    UpstreamRoute,
    load_routes_file,
)
from gateway.settings import Settings
from model.engine import Engine

# Builds the local engine from the settings of its route (its model id and aliases).
LocalEngineFactory = Callable[[Settings], Engine]


# -- runtime ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    model: str  # canonical: what responses name
    engine: Engine
    kind: EngineKind = "local"
    aliases: tuple[str, ...] = ()
    policy: str | None = None  # a per-route guard policy name (None: the key's or default)
    spec: BaseRoute | None = field(default=None, compare=False)


class ModelRouter:
    """Resolves requested model names to routes; owns the engines' start and stop."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._by_name: dict[str, Route] = {}
        for route in self.routes:
            for name in (route.model, *route.aliases):
                self._by_name.setdefault(name.strip().lower(), route)

    @classmethod
    def from_settings(
        cls, settings: Settings, local_engine_factory: LocalEngineFactory
    ) -> ModelRouter:
        """`settings.routes_file` unset: the local engine under settings.model_id and aliases.
        `local_engine_factory(settings)` is called only when a local route exists."""
        path = settings.routes_file
        if path is None:
            engine = local_engine_factory(settings)
            aliases = tuple(settings.model_aliases)
            return cls([Route(settings.model_id, engine, "local", aliases)])
        return cls.from_spec(load_routes_file(path), settings, local_engine_factory, path)

    @classmethod
    def from_spec(
        cls,
        spec: RoutesFile,
        settings: Settings,
        local_engine_factory: LocalEngineFactory,
        source: object = "<routes>",
    ) -> ModelRouter:
        routes, errors = [], []
        for i, r in enumerate(spec.routes):
            try:
                engine = _build_engine(r, settings, local_engine_factory)
            except ValueError as exc:
                errors.append(f"routes[{i}].{exc}")
                continue
            routes.append(Route(r.model, engine, r.engine, tuple(r.aliases), r.policy, r))
        if errors:
            raise RoutesFileError(str(source), errors)
        return cls(routes)

    def resolve(self, requested: str) -> Route | None:
        """Case-insensitive match on names and aliases, surrounding blanks ignored."""
        return self._by_name.get(requested.strip().lower())

    def canonical_model_id(self, requested: str) -> str | None:
        route = self.resolve(requested)
        return route.model if route is not None else None

    def model_ids(self) -> list[str]:
        return [r.model for r in self.routes]

    @property
    def engines(self) -> list[Engine]:
        unique: dict[int, Engine] = {}
        for route in self.routes:
            unique.setdefault(id(route.engine), route.engine)
        return list(unique.values())

    async def start(self) -> None:
        await asyncio.gather(*(e.start() for e in self.engines))

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)

    def not_ready(self) -> list[str]:
        """Models whose engine cannot serve yet (for /readyz)."""
        return [r.model for r in self.routes if not r.engine.ready()]


def _api_key(route: RemoteRoute) -> str | None:
    if route.api_key_env:
        value = os.environ.get(route.api_key_env)
        if not value:
            raise ValueError(f"api_key_env: environment variable {route.api_key_env} is not set")
        return value
    if route.api_key_file:
        try:
            return route.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"api_key_file: cannot read {route.api_key_file}: {exc}") from None
    return None


def _build_engine(
    route: BaseRoute, settings: Settings, local_factory: LocalEngineFactory
) -> Engine:
    if isinstance(route, LocalRoute):
        update = {"model_id": route.model, "model_aliases": list(route.aliases)}
        return local_factory(settings.model_copy(update=update))
    if isinstance(route, UpstreamRoute):
        from model.upstream import OpenAIUpstreamEngine, UpstreamConfig

        t = route.timeouts
        return OpenAIUpstreamEngine(
            UpstreamConfig(
                model_id=route.model,
                api_base=route.api_base,
                upstream_model=route.upstream_model,
                api_key=_api_key(route),
                connect_timeout_s=t.connect,
                read_timeout_s=t.read,
                total_timeout_s=t.total,
                pool_timeout_s=t.pool,
                pool_size=route.pool_size,
                retries=route.retries,
                context_length=route.context_length,
                tokenizer_path=route.tokenizer_path,
            )
        )
    if isinstance(route, LiteLLMRoute):
        from model.litellm_engine import LiteLLMConfig, LiteLLMEngine

        t = route.timeouts
        return LiteLLMEngine(
            LiteLLMConfig(
                model_id=route.model,
                litellm_model=route.litellm_model,
                api_key=_api_key(route),
                api_base=route.api_base,
                kwargs=dict(route.litellm_kwargs),
                connect_timeout_s=t.connect,
                read_timeout_s=t.read,
                total_timeout_s=t.total,
                retries=route.retries,
                context_length=route.context_length,
                tokenizer_path=route.tokenizer_path,
            )
        )
    raise ValueError(f"engine: unsupported route type {type(route).__name__}")
