"""The FastAPI application factory. Serving objects are built once, in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
import transformers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway import admin
from gateway.auth import AuthService, ensure_demo_key, register_bootstrap_key
from gateway.chat import ChatService, engine_failure
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.images import ImageLimits, ImageLoader
from gateway.keys import KeyStore
from gateway.logging import configure_logging
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestContextMiddleware
from gateway.model_routes import ModelRouter
from gateway.moderation import GuardServices
from gateway.ratelimit import RateLimiter
from gateway.redis_conn import RedisConnection, RedisMetrics
from gateway.routes import router
from gateway.settings import Settings
from model.engine import Engine, EngineOverloaded
from model.upstream import UpstreamError

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
    """The one place where errors become the OpenAI envelope."""
    return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)


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
        state = app.state
        state.background = set()
        redis_conn = await RedisConnection.open(settings)
        redis_metrics = RedisMetrics(metrics.registry)
        key_store = KeyStore.from_settings(settings, redis_conn.client, metrics=redis_metrics)
        state.redis, state.key_store = redis_conn, key_store
        router = ModelRouter.from_settings(settings, lambda s: engine or build_engine(s))
        state.router = router
        state.auth = AuthService(
            key_store,
            canonical_model=router.canonical_model_id,
            failure_mode=settings.redis_failure_mode,
        )
        state.limiter = RateLimiter.from_settings(
            settings, redis_conn.client, metrics=redis_metrics
        )
        # In the background: the gateway starts (and readyz reports Redis) while Redis is down.
        bootstrap = asyncio.create_task(
            register_bootstrap_key(key_store, settings, retry_interval_s=1.0)
        )
        state.guards = guards = await GuardServices.start(settings, metrics.registry)
        await router.start()
        images = ImageLoader(ImageLimits.from_settings(settings))
        first = router.routes[0].engine.info
        digest = hashlib.sha256(
            f"{first.model_id}|{first.dtype}|{transformers.__version__}".encode()
        ).hexdigest()
        state.chat = ChatService(settings, router, images, metrics, f"fp_{digest[:10]}", guards)
        state.policy_exists = guards.store.__contains__
        if settings.demo_mode and not settings.bootstrap_key:
            demo_key = await ensure_demo_key(key_store, settings)
            print(demo_banner(settings, demo_key), file=sys.stderr)
        try:
            yield
        finally:
            bootstrap.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await bootstrap
            await router.stop()
            await images.aclose()
            await guards.stop()
            if state.background:
                await asyncio.wait(state.background, timeout=2)
            await redis_conn.close()

    app = FastAPI(title="Llama 3.2-Vision safety gateway", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin.router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(UpstreamError)
    @app.exception_handler(EngineOverloaded)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        return error_response(engine_failure(exc))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect) -> Response:
        # Nobody is listening; nothing to log as a server error.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(InvalidRequest(f"Invalid request: {first['msg']}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("Not found."))
        err = GatewayError(str(exc.detail), error_type="invalid_request_error")
        err.status_code = exc.status_code
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", error_type=type(exc).__name__)
        return error_response(GatewayError("The server had an error processing your request."))
