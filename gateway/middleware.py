"""Pure ASGI middleware: request id on every response, access log and request metrics.

Pure ASGI (not BaseHTTPMiddleware) so that streamed responses pass through unbuffered.
"""

from __future__ import annotations

import json
import re
import secrets
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics

log = structlog.get_logger("gateway.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _route_label(path: str) -> str:
    # Bounded label values: never the raw path (ids would explode the metric's cardinality).
    for prefix in (
        "/v1/chat/completions",
        "/v1/moderations",
        "/v1/models",
        "/admin/keys",
        "/admin/policies",
        "/admin/audit",
        "/workbench",
    ):
        if path.startswith(prefix):
            return prefix
    if path in ("/healthz", "/readyz", "/metrics"):
        return path
    return "other"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Bound once (with the logging configuration of this app): the module's lazy proxy
        # builds a new bound logger on every call, a cost on every request's access line.
        self._access_log = log.bind()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        client_id = sent.decode("latin-1")
        request_id = client_id if _REQUEST_ID.match(client_id) else f"req_{secrets.token_hex(12)}"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # An unexpected error: answered here (not by Starlette's outermost error handler)
            # so that the 500 carries the envelope and the request id like every response.
            log.exception("unhandled_error", path=scope["path"])
            if started_response:
                raise
            body = json.dumps(
                GatewayError("The server had an error processing your request.").envelope()
            ).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe_request(_route_label(scope["path"]), status, elapsed)
            self._access_log.info(
                "request",
                method=scope.get("method"),
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )
            structlog.contextvars.clear_contextvars()
