"""The FastAPI application factory. Serving objects are built once, in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
import transformers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import admin
from gateway.admin_extras import admin_extras
from gateway.audit import AuditLog
from gateway.auth import AuthService, demo_key
from gateway.chat import ChatService
from gateway.configured_keys import ConfiguredKeys
from gateway.errors import GatewayError, InvalidRequest, NotFound, as_gateway_error, is_mapped
from gateway.guard_services import GuardServices
from gateway.images import ImageLimits, ImageLoader
from gateway.keys import KeyStore
from gateway.logging import configure_logging
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestContextMiddleware
from gateway.model_router import ModelRouter
from gateway.moderations import ModerationService
from gateway.moderations import router as moderations_router
from gateway.openapi import describe_raw_routes
from gateway.public_api import CHAT_PATH, ChatCompletions, router
from gateway.ratelimit import RateLimiter
from gateway.redis_conn import RedisConnection, RedisMetrics
from gateway.services import AppState, Services, app_state
from gateway.settings import Settings
from model.engine import Engine
from model.errors import ModelError

log = structlog.get_logger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The local engine over GATEWAY_MODEL_PATH, or the demo model (built once) when unset."""
    from model.local_engine import LocalMllamaEngine

    path = settings.model_path
    if path is None:
        from model.demo_model import ensure_demo_model

        path = ensure_demo_model(settings.state_dir / "demo-model")
    if settings.engine == "fast":
        from model.fast import FastEngineConfig, FastMllamaEngine

        gib = settings.engine_cache_gib
        config = FastEngineConfig(
            # Not the model's 131k: one slot at full context would be ~17 GB at 11B.
            max_len=settings.context_length or 4096,
            max_slots=settings.engine_max_slots,
            max_waiting=settings.engine_max_waiting,
            memory_budget_bytes=None if gib is None else int(gib * 2**30),
            max_images_per_request=settings.max_images_per_request,
        )
        return FastMllamaEngine(
            path, model_id=settings.model_id, device=settings.device, config=config
        )
    return LocalMllamaEngine(
        path,
        model_id=settings.model_id,
        device=settings.device,
        max_batch_size=settings.max_batch_size,
        context_length=settings.context_length,
    )


def error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)


def exception_response(exc: BaseException) -> Response:
    """The one exception handler: whatever a request raised, as the client's response, for
    the FastAPI routes and the raw chat endpoint alike. Gateway and model errors go through
    the table (`gateway.errors.ERRORS`); the framework's own become gateway errors first."""
    if is_mapped(exc):
        return error_response(as_gateway_error(exc))
    if isinstance(exc, ClientDisconnect):
        # Nobody is listening; nothing to log as a server error.
        return Response(status_code=499)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(InvalidRequest(f"Invalid request: {first['msg']}", param=param))
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(NotFound("Not found."))
        return error_response(
            GatewayError(
                str(exc.detail), error_type="invalid_request_error", status=exc.status_code
            )
        )
    log.error("unhandled_error", error_type=type(exc).__name__, exc_info=exc)
    return error_response(GatewayError("The server had an error processing your request."))


class GatewayApp(FastAPI):
    """FastAPI, except that `POST /v1/chat/completions` goes straight to its raw ASGI endpoint
    (wrapped in the same request-context middleware) before FastAPI's middleware stack and
    routing: a large share of a guards-off request's CPU (bench/NOTES.md). The endpoint is
    also a route of the app, so the path still gets 405 for other methods, and a request that
    does not match the fast path exactly (a root path) is still served."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_routes: dict[str, ASGIApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.fast_routes.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document plus the raw chat route, from the model that parses its body
        (built once, on the first `GET /openapi.json`; the request path never calls this)."""
        if self.openapi_schema is None:
            self.openapi_schema = describe_raw_routes(super().openapi(), CHAT_PATH)
        return self.openapi_schema


def demo_banner(settings: Settings, key: str) -> str:
    base = f"http://{settings.host}:{settings.port}"
    return (
        "\nDemo mode: a tiny random Llama 3.2-Vision-architecture model (it answers gibberish "
        "by design, through the real code path).\n"
        f"API key: {key}\n"
        f"Try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-H 'Authorization: Bearer {key}' "
        f'-d \'{{"model": "{settings.model_id}", "messages": '
        '[{"role": "user", "content": "Hello!"}], "max_tokens": 32}\'\n'
    )


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app_state(app)
        redis_conn = await RedisConnection.open(settings)
        redis_metrics = RedisMetrics(metrics.registry)
        key_store = KeyStore.from_settings(settings, redis_conn.client, metrics=redis_metrics)
        router = ModelRouter.from_settings(settings, lambda s: engine or build_engine(s))
        # The bootstrap key (and the demo's): registered now, restored if Redis loses it.
        configured = ConfiguredKeys.from_settings(key_store, settings)
        demo = (
            await demo_key(settings) if settings.demo_mode and not settings.bootstrap_key else None
        )
        if demo is not None:
            configured.add("demo", demo, setting="the demo key")
        auth = AuthService.from_settings(key_store, settings, router, configured=configured)
        limiter = RateLimiter.from_settings(settings, redis_conn.client, metrics=redis_metrics)
        # In the background: the gateway starts (and readyz reports Redis) while Redis is down.
        bootstrap = asyncio.create_task(configured.register(retry_interval_s=1.0))
        guards = await GuardServices.start(settings, metrics.registry)
        audit = guards.audit = AuditLog.from_settings(settings, redis_conn.client, metrics.registry)
        if audit is not None:
            audit.start()
        await router.start()
        images = ImageLoader(ImageLimits.from_settings(settings))
        first = router.routes[0].engine.info
        digest = hashlib.sha256(
            f"{first.model_id}|{first.dtype}|{transformers.__version__}".encode()
        ).hexdigest()
        services = Services(
            settings=settings,
            metrics=metrics,
            started=state.started,
            redis=redis_conn,
            key_store=key_store,
            configured_keys=configured,
            router=router,
            auth=auth,
            limiter=limiter,
            guards=guards,
            audit=audit,
            images=images,
            chat=ChatService(settings, router, images, metrics, f"fp_{digest[:10]}", guards),
            moderations=ModerationService(settings, guards, images, router.routes[0].engine),
        )
        state.services = services
        if demo is not None:
            print(demo_banner(settings, demo), file=sys.stderr)
        # What start-up built (torch, transformers, the guards: hundreds of thousands of
        # objects) lives as long as the process: take it out of the cyclic collector's sight.
        # Otherwise every few thousand requests a full collection walks all of it, a stall for
        # every request in flight (p99, Redis deadlines missed; bench/NOTES.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            bootstrap.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await bootstrap
            await router.stop()
            await images.aclose()
            await guards.stop()
            if audit is not None:
                await audit.stop()
            if services.background:
                await asyncio.wait(services.background, timeout=2)
            await limiter.aclose()
            await redis_conn.close()
            gc.unfreeze()  # several apps may share a process (tests): let the next one collect

    app = GatewayApp(title="Llama 3.2-Vision safety gateway", lifespan=lifespan)
    # The one thing stored on app.state; read through gateway.services.
    app.state.gateway = AppState(settings, metrics, started=int(time.time()))
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    for kind in (
        GatewayError,
        ModelError,
        ClientDisconnect,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, _handle)
    chat = ChatCompletions(exception_response)
    app.router.routes.append(Route(CHAT_PATH, chat, methods=["POST"], include_in_schema=False))
    app.fast_routes = {CHAT_PATH: RequestContextMiddleware(chat, metrics=metrics)}
    app.include_router(router)
    app.include_router(admin.router)
    app.include_router(moderations_router)
    for extra in admin_extras():
        app.include_router(extra)
    return app


async def _handle(_: Request, exc: Exception) -> Response:
    return exception_response(exc)
