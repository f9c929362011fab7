"""The public routes: chat completions, models, health, readiness and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.admin import require_admin
from gateway.auth import AuthService
from gateway.chat import ChatService, PreparedChat
from gateway.errors import GatewayError, ModelNotFound, RequestTooLarge
from gateway.metrics import GatewayMetrics
from gateway.moderation import GuardServices, policy_header
from gateway.ratelimit import Admission, RateLimiter
from gateway.settings import Settings
from gateway.streaming import stream_chat

log = structlog.get_logger(__name__)

router = APIRouter()


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


def _settle_later(request: Request, limiter: RateLimiter, adm: Admission, used: int) -> None:
    """Settle in a task of its own: it must run even when the client's task was cancelled."""
    pending: set[asyncio.Task[None]] = request.app.state.background
    task = asyncio.get_running_loop().create_task(limiter.settle(adm, used))
    pending.add(task)
    task.add_done_callback(pending.discard)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    auth: AuthService = state.auth
    limiter: RateLimiter = state.limiter
    chat_service: ChatService = state.chat
    key = await auth.authenticate(request.headers.get("authorization"))
    body = await read_body(request, settings.max_body_bytes)
    chat = await chat_service.prepare(
        body, authorize=lambda model: auth.check_model(key, model), policy_name=key.policy
    )
    adm = await limiter.admit(key, chat.prompt_tokens, chat.reserved_completion_tokens)
    headers = {**adm.headers(), "x-policy": policy_header(chat.policy)}
    try:
        await chat_service.check_input(chat)
    except GatewayError as exc:
        _settle_later(request, limiter, adm, chat.prompt_tokens)
        exc.headers = {**headers, **exc.headers}
        raise
    if chat.request.stream:
        return StreamingResponse(
            _settled_stream(request, chat_service, limiter, adm, chat),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
        )
    try:
        async with limiter.heartbeat(adm):
            payload = await chat_service.complete(chat)
    finally:
        _settle_later(request, limiter, adm, chat.used_tokens)
    return JSONResponse(payload, headers=headers)


async def _settled_stream(
    request: Request,
    chat_service: ChatService,
    limiter: RateLimiter,
    adm: Admission,
    chat: PreparedChat,
) -> AsyncIterator[bytes]:
    try:
        async with limiter.heartbeat(adm):
            async for chunk in stream_chat(chat_service, chat):
                yield chunk
    finally:
        _settle_later(request, limiter, adm, chat.used_tokens)


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llama-gateway"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = request.app.state
    await state.auth.authenticate(request.headers.get("authorization"))
    cards = [_model_card(m, state.started) for m in state.router.model_ids()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = request.app.state
    await state.auth.authenticate(request.headers.get("authorization"))
    canonical = state.router.canonical_model_id(model_id)
    if canonical is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return _model_card(canonical, state.started)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response:
    state = request.app.state
    router = getattr(state, "router", None)
    redis = getattr(state, "redis", None)
    reasons: dict[str, str] = {}
    if router is None:
        reasons["engine"] = "the model engine is not loaded"
    elif down := router.not_ready():
        reasons["engine"] = "not ready: " + ", ".join(down)
    if redis is None:
        reasons["redis"] = "redis is not connected"
    elif (problem := await redis.check()) is not None:
        reasons["redis"] = problem
    guards: GuardServices | None = getattr(state, "guards", None)
    if guards is None:
        reasons["policies"] = "policies are not loaded"
    else:
        ok, why = guards.store.ready()
        if not ok:
            reasons["policies"] = why
    checks = {name: name not in reasons for name in ("engine", "redis", "policies")}
    if not reasons:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {"status": "not ready", "checks": checks, "reason": "; ".join(reasons.values())},
        status_code=503,
    )


@router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/admin/policies", dependencies=[Depends(require_admin)])
async def admin_policies(request: Request) -> dict[str, Any]:
    guards: GuardServices = request.app.state.guards
    return {"object": "list", "data": guards.store.status()}
