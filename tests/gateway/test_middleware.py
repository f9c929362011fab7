"""The request-context middleware: request id, and an unexpected error still gets both."""

from __future__ import annotations

import httpx
from starlette.types import Receive, Scope, Send

from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestContextMiddleware


async def test_an_unexpected_error_is_a_500_envelope_with_the_request_id() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("a bug")

    metrics = GatewayMetrics()
    app = RequestContextMiddleware(broken, metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.get("/admin/keys", headers={"x-request-id": "trace-1"})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"] == "trace-1"
    assert resp.json()["error"]["type"] == "server_error"
    assert "a bug" not in resp.text  # internals are logged, not shown
    assert b'status="500"' in metrics.render()
