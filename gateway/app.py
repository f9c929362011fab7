"""The FastAPI application factory. Serving objects are built once, in the lifespan."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
import transformers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.chat import ChatService
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RequestTooLarge,
)
from gateway.images import ImageLimits, ImageLoader
from gateway.logging import configure_logging
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestContextMiddleware
from gateway.settings import Settings
from model.engine import Engine

log = structlog.get_logger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The local engine over GATEWAY_MODEL_PATH, or the demo model (built once) when unset."""
    from model.local_engine import LocalMllamaEngine

    path = settings.model_path
    if path is None:
        from model.demo_model import ensure_demo_model

        path = ensure_demo_model(settings.state_dir / "demo-model")
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


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = engine or build_engine(settings)
        await served.start()
        images = ImageLoader(ImageLimits.from_settings(settings))
        fingerprint = (
            "fp_"
            + hashlib.sha256(
                f"{settings.model_id}|{served.info.dtype}|{transformers.__version__}".encode()
            ).hexdigest()[:10]
        )
        app.state.engine = served
        app.state.chat = ChatService(settings, served, images, metrics, fingerprint)
        try:
            yield
        finally:
            await served.stop()
            await images.aclose()

    app = FastAPI(title="Llama 3.2-Vision safety gateway", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    _install_error_handlers(app)
    _install_routes(app, settings)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

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


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body with a cap: 413 before reading when Content-Length says too much."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body too large: {declared} bytes (limit {limit}).")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"Request body too large (limit {limit} bytes).")
        chunks.append(chunk)
    return b"".join(chunks)


def _install_routes(app: FastAPI, settings: Settings) -> None:
    created = int(time.time())

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        chat_service: ChatService = request.app.state.chat
        chat = await chat_service.prepare(body)
        if chat.request.stream:
            return StreamingResponse(
                chat_service.stream(chat),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return JSONResponse(await chat_service.complete(chat))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [_model_card(m, created) for m in settings.served_model_ids()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        canonical = settings.canonical_model_id(model_id)
        if canonical is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
        return _model_card(canonical, created)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz(request: Request) -> Response:
        engine: Engine | None = getattr(request.app.state, "engine", None)
        checks = {"engine": bool(engine is not None and engine.ready())}
        if all(checks.values()):
            return JSONResponse({"status": "ready", "checks": checks})
        reasons = [f"{name} not ready" for name, ok in checks.items() if not ok]
        return JSONResponse(
            {"status": "not ready", "checks": checks, "reason": "; ".join(reasons)},
            status_code=503,
        )

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        metrics: GatewayMetrics = request.app.state.metrics
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llama-gateway"}
