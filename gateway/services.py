"""The serving objects of one app, in one typed container, and how a route gets them.

`gateway.app.create_app` makes the app's `AppState` (the settings and metrics: what exists
before start-up, so `/readyz`, `/metrics` and the admin token check work at any time) and stores
it once, as `app.state.gateway`. The lifespan builds the `Services` once and sets
`AppState.services`. A FastAPI route takes them as parameters (`ServicesDep`, `SettingsDep`,
`AppStateDep`); the raw chat endpoint calls `services_of(scope["app"])`. Nothing else reads
`app.state`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from starlette.applications import Starlette

from gateway.errors import ServiceUnavailable
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings

if TYPE_CHECKING:  # the services import the route modules' neighbours: no import at run time
    from gateway.audit import AuditLog
    from gateway.auth import AuthService
    from gateway.chat import ChatService
    from gateway.configured_keys import ConfiguredKeys
    from gateway.guard_services import GuardServices
    from gateway.images import ImageLoader
    from gateway.keys import KeyStore
    from gateway.model_router import ModelRouter
    from gateway.moderations import ModerationService
    from gateway.ratelimit import RateLimiter
    from gateway.redis_conn import RedisConnection


@dataclass(frozen=True, eq=False)
class Services:
    """Everything a request is served with, built once in the lifespan (`gateway.app`)."""

    settings: Settings
    metrics: GatewayMetrics
    started: int  # Unix seconds the app was made: the model cards' `created`
    redis: RedisConnection
    key_store: KeyStore
    # The bootstrap and demo keys, restored when Redis loses them (readyz checks them).
    configured_keys: ConfiguredKeys
    router: ModelRouter
    auth: AuthService
    limiter: RateLimiter
    guards: GuardServices
    audit: AuditLog | None  # None when GATEWAY_AUDIT_ENABLED=false
    images: ImageLoader
    chat: ChatService
    moderations: ModerationService
    # Settle tasks still running (`ratelimit.settle_in_background`); awaited at shutdown.
    background: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass(eq=False)
class AppState:
    """`app.state.gateway`: made by the app factory; `services` once the lifespan built them."""

    settings: Settings
    metrics: GatewayMetrics
    started: int
    services: Services | None = None


def app_state(app: Starlette) -> AppState:
    state = app.state.gateway
    if not isinstance(state, AppState):
        raise TypeError("app.state.gateway is not an AppState: make the app with create_app")
    return state


def services_of(app: Starlette) -> Services:
    """The app's services, or 503 while the gateway is still starting."""
    services = app_state(app).services
    if services is None:
        raise ServiceUnavailable("The gateway is starting; retry shortly.")
    return services


async def request_app_state(request: Request) -> AppState:
    return app_state(request.app)


async def request_services(request: Request) -> Services:
    return services_of(request.app)


async def request_settings(request: Request) -> Settings:
    return app_state(request.app).settings


# Route parameters (the dependencies are async: FastAPI would run a plain function in a thread).
AppStateDep = Annotated[AppState, Depends(request_app_state)]
ServicesDep = Annotated[Services, Depends(request_services)]
SettingsDep = Annotated[Settings, Depends(request_settings)]
