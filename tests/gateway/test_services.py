"""The app's services before the lifespan built them: what must answer, and what waits for it."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.app import create_app
from gateway.services import app_state
from gateway.settings import Settings

TOKEN = "admin-token-0123456789"


async def test_before_start_up(tmp_path: Path) -> None:
    app = create_app(Settings(state_dir=tmp_path, admin_token=TOKEN))
    assert app_state(app).services is None  # no lifespan has run
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {
            "engine": False,
            "redis": False,
            "bootstrap_key": True,
            "policies": False,
        }
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/workbench")).status_code == 200
        assert (await c.get("/admin/keys")).status_code == 401  # the token is checked first
        for method, path, headers in (
            ("GET", "/v1/models", {}),
            ("POST", "/v1/chat/completions", {}),
            ("POST", "/v1/moderations", {}),
            ("GET", "/admin/keys", admin),
            ("GET", "/admin/audit", admin),
        ):
            resp = await c.request(method, path, headers=headers)
            assert resp.status_code == 503, (path, resp.text)
            assert resp.json()["error"]["code"] == "service_unavailable"


async def test_admin_api_off_before_start_up_too(tmp_path: Path) -> None:
    app = create_app(Settings(state_dir=tmp_path, admin_token=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        resp = await c.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "admin_disabled"
