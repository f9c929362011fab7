"""The public routes: chat completions (a raw ASGI endpoint), models, health, readiness, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gateway.admin import require_admin
from gateway.audit import AuditContext
from gateway.chat import ChatService
from gateway.errors import ModelNotFound, RequestTooLarge, with_headers
from gateway.guard_services import policy_header
from gateway.prepared_chat import PreparedChat
from gateway.ratelimit import Admission, settle_in_background
from gateway.services import AppStateDep, Services, ServicesDep, services_of
from gateway.sse import ChatStream
from model.openai_wire import json_bytes

T = TypeVar("T")

log = structlog.get_logger(__name__)

router = APIRouter()


CHAT_PATH = "/v1/chat/completions"
_JSON_TYPE = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_SSE_TYPE = (b"content-type", b"text/event-stream; charset=utf-8")


class ChatCompletions:
    """`POST /v1/chat/completions` as a raw ASGI app.

    It is the gateway's hot path, and FastAPI's per-request work (middleware stack, routing,
    dependency solving, cookie parsing, response classes, an anyio task group per stream) was
    a large share of a guards-off request's CPU (bench/NOTES.md). Headers, status codes and
    bodies are what the FastAPI route sent; every error still becomes its response through
    `exception_response` (by the one table, `gateway.errors.ERRORS`).
    """

    def __init__(self, exception_response: Callable[[BaseException], Response]) -> None:
        self._exception_response = exception_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            services = services_of(scope["app"])
            chat, adm, headers = await _admitted(services, scope, receive)
        except Exception as exc:
            await self._fail(exc, scope, receive, send)
            return
        # Admitted: from here on the reservation is settled exactly once, whatever happens.
        # (Its concurrency lease, if any, is renewed by the limiter's LeaseKeeper until then.)
        limiter = services.limiter
        try:
            if chat.request.stream:
                await self._stream(services.chat, chat, headers, scope, receive, send)
                return
            try:
                payload = await _unless_disconnected(services.chat.complete(chat), receive)
            except Exception as exc:
                await self._fail(with_headers(exc, headers), scope, receive, send)
                return
            if payload is None:
                return  # the client left: generation was cancelled, nobody to answer
            body = json_bytes(payload)
            raw = [*_raw(headers), (b"content-length", b"%d" % len(body)), _JSON_TYPE]
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            await send({"type": "http.response.body", "body": body})
        finally:
            settle_in_background(services.background, limiter, adm, chat.tokens.total)

    async def _stream(
        self,
        service: ChatService,
        chat: PreparedChat,
        headers: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        stream = ChatStream(service, chat)
        try:
            try:
                # An engine that fails before its first event (upstream 5xx, timeout, overload)
                # is a real HTTP error, not a 200 whose stream carries the error.
                await stream.start()
            except Exception as exc:
                await self._fail(with_headers(exc, headers), scope, receive, send)
                return
            raw = [*_SSE_HEADERS, *_raw(headers), _SSE_TYPE]
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            await _send_until_disconnect(stream.chunks(), receive, send)
        finally:
            await stream.aclose()

    async def _fail(self, exc: BaseException, scope: Scope, receive: Receive, send: Send) -> None:
        await self._exception_response(exc)(scope, receive, send)


async def _admitted(
    services: Services, scope: Scope, receive: Receive
) -> tuple[PreparedChat, Admission, dict[str, str]]:
    """Key, body, parse, limits, input guards: the request admitted, or the error raised."""
    settings = services.settings
    auth = services.auth
    limiter = services.limiter
    chat_service = services.chat
    key = await auth.authenticate(_header(scope, b"authorization"))
    body = await read_body(receive, _header(scope, b"content-length"), settings.max_body_bytes)
    chat = await chat_service.prepare(
        body, authorize=lambda model: auth.check_model(key, model), policy_name=key.policy
    )
    chat.audit_context = AuditContext(
        request_id=structlog.contextvars.get_contextvars().get("request_id"),
        key_id=key.id,
        key_name=key.name,
        endpoint=CHAT_PATH,
    )
    adm = await limiter.admit(key, chat.tokens.prompt, chat.tokens.reserved_completion)
    headers = adm.headers()
    headers["x-policy"] = policy_header(chat.policy)
    try:
        await chat_service.check_input(chat)
    except Exception as exc:
        settle_in_background(services.background, limiter, adm, chat.tokens.total)
        raise with_headers(exc, headers) from None
    return chat, adm, headers


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header (ASGI servers give the names in lower case)."""
    value: bytes
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """Read the body with a cap: 413 before reading when Content-Length says too much."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body too large: {declared} bytes (limit {limit}).")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"Request body too large (limit {limit} bytes).")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def _send_until_disconnect(
    chunks: AsyncGenerator[bytes, None], receive: Receive, send: Send
) -> None:
    """Send the SSE chunks; a client that disconnects cancels the stream (and so generation),
    as Starlette's StreamingResponse did (the server drops writes to a closed connection
    silently, so only `http.disconnect` tells)."""

    async def send_all() -> None:
        async with aclosing(chunks):
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    await _unless_disconnected(send_all(), receive)


async def _unless_disconnected(work: Coroutine[Any, Any, T], receive: Receive) -> T | None:
    """Run `work`, cancelled (returning None) if the client disconnects first: a request whose
    client gave up must not keep the model busy, nor its concurrency slot.

    `work` runs in this task; one watcher task cancels it when the client leaves. (A task for
    `work` as well, and `asyncio.wait` over both, cost several times more per request on the
    hot path: bench/NOTES.md.)"""
    current = asyncio.current_task()
    assert current is not None
    client_left = False

    async def watch() -> None:
        nonlocal client_left
        while (await receive())["type"] != "http.disconnect":
            pass
        client_left = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        # Ours to swallow only when the watcher asked and nobody else (shutdown) did too.
        if client_left and current.uncancel() == 0:
            return None
        raise
    finally:
        watcher.cancel()


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llama-gateway"}


@router.get("/v1/models")
async def list_models(request: Request, services: ServicesDep) -> dict[str, Any]:
    await services.auth.authenticate(request.headers.get("authorization"))
    cards = [_model_card(m, services.started) for m in services.router.model_ids()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, services: ServicesDep) -> dict[str, Any]:
    await services.auth.authenticate(request.headers.get("authorization"))
    canonical = services.router.canonical_model_id(model_id)
    if canonical is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return _model_card(canonical, services.started)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(state: AppStateDep) -> Response:
    services = state.services  # None until the lifespan has built them
    reasons: dict[str, str] = {}
    if services is None:
        reasons["engine"] = "the model engine is not loaded"
        reasons["redis"] = "redis is not connected"
        reasons["policies"] = "policies are not loaded"
    else:
        reasons.update(await _not_ready(services))
    names = ("engine", "redis", "bootstrap_key", "policies")
    checks = {name: name not in reasons for name in names}
    if not reasons:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {"status": "not ready", "checks": checks, "reason": "; ".join(reasons.values())},
        status_code=503,
    )


async def _not_ready(services: Services) -> dict[str, str]:
    """Why the started gateway cannot serve, per check (empty when it can)."""
    reasons: dict[str, str] = {}
    if down := services.router.not_ready():
        reasons["engine"] = "not ready: " + ", ".join(down)
    if (problem := await services.redis.check()) is not None:
        reasons["redis"] = problem
    elif services.configured_keys and (problem := await services.configured_keys.check()):
        reasons["bootstrap_key"] = problem  # e.g. Redis read-only or full: no key, all 401
    ok, why = services.guards.ready()
    if not ok:
        reasons["policies"] = why
    return reasons


@router.get("/metrics")
async def metrics_endpoint(state: AppStateDep) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/admin/policies", dependencies=[Depends(require_admin)])
async def admin_policies(services: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": services.guards.status()}
