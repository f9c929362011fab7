"""The admin router on a bare FastAPI app, against the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.admin import key_store, policy_exists, router
from gateway.errors import GatewayError
from gateway.keys import KeyStore
from gateway.services import request_settings
from gateway.settings import Settings
from tests.gateway.conftest import requires_redis

TOKEN = "admin-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


pytestmark = requires_redis


def build_app(store: KeyStore, admin_token: str | None = TOKEN) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(GatewayError)
    async def envelope(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status_code, headers=exc.headers)

    app.dependency_overrides[request_settings] = lambda: Settings(admin_token=admin_token)
    app.dependency_overrides[key_store] = lambda: store
    app.dependency_overrides[policy_exists] = lambda: (
        lambda name: name in {"default", "strict", "audit"}
    )
    app.include_router(router)
    return app


@pytest_asyncio.fixture
async def http(store: KeyStore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


async def test_auth_required(http: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                             ("DELETE", "/admin/keys/key_x")):  # fmt: skip
            resp = await http.request(method, path, headers=headers, json={"name": "x"})
            err = assert_error(resp, 401)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"


async def test_disabled_without_admin_token(store: KeyStore) -> None:
    transport = httpx.ASGITransport(app=build_app(store, admin_token=None))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        resp = await c.get("/admin/keys", headers={"Authorization": "Bearer "})
    assert assert_error(resp, 404)["code"] == "admin_disabled"


async def test_key_lifecycle(http: httpx.AsyncClient, store: KeyStore) -> None:
    body = {"name": "app", "rpm": 60, "tpm": 10000, "max_concurrency": 4,
            "models": ["meta-llama/llama-3.2-11b-vision-instruct"], "policy": "strict",
            "expires_at": "2999-12-31T23:59:59+02:00"}  # fmt: skip
    created = await http.post("/admin/keys", json=body, headers=AUTH)
    assert created.status_code == 201, created.text
    data = created.json()
    plain, key_id = data["key"], data["id"]
    assert plain.startswith("sk-") and key_id.startswith("key_")
    assert data["expires_at"] == "2999-12-31T21:59:59Z" and data["policy"] == "strict"
    assert (await store.lookup(plain)) is not None

    listed = await http.get("/admin/keys", headers=AUTH)
    assert listed.status_code == 200
    page = listed.json()
    assert page["object"] == "list" and [k["id"] for k in page["data"]] == [key_id]
    assert plain not in listed.text and "key_hash" not in listed.text
    assert "key" not in page["data"][0]

    got = await http.get(f"/admin/keys/{key_id}", headers=AUTH)
    assert got.status_code == 200 and got.json()["rpm"] == 60 and plain not in got.text

    patch = {"rpm": None, "tpm": 5, "models": None, "disabled": True, "policy": "audit"}
    patched = await http.patch(f"/admin/keys/{key_id}", json=patch, headers=AUTH)
    assert patched.status_code == 200, patched.text
    p = patched.json()
    assert (p["rpm"], p["tpm"], p["max_concurrency"], p["models"]) == (None, 5, 4, None)
    assert p["disabled"] is True and p["policy"] == "audit" and p["name"] == "app"
    unchanged = await http.patch(f"/admin/keys/{key_id}", json={}, headers=AUTH)
    assert unchanged.json() == p

    deleted = await http.delete(f"/admin/keys/{key_id}", headers=AUTH)
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(await http.delete(f"/admin/keys/{key_id}", headers=AUTH), 404)
    assert_error(await http.get(f"/admin/keys/{key_id}", headers=AUTH), 404)
    assert_error(await http.patch(f"/admin/keys/{key_id}", json={}, headers=AUTH), 404)
    assert (await http.get("/admin/keys", headers=AUTH)).json()["data"] == []


async def test_create_defaults(http: httpx.AsyncClient) -> None:
    resp = await http.post("/admin/keys", json={"name": "  plain  "}, headers=AUTH)
    data = resp.json()
    assert resp.status_code == 201 and data["name"] == "plain"
    assert (data["rpm"], data["models"], data["expires_at"], data["disabled"]) == (
        None, None, None, False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "rpm": "abc"}, "rpm"),
        ({"name": "x", "rpm": "50"}, "rpm"),
        ({"name": "x", "rpm": -1}, "rpm"),
        ({"name": "x", "rpm": 0}, "rpm"),
        ({"name": "x", "tpm": 1.5}, "tpm"),
        ({"name": "x", "max_concurrency": True}, "max_concurrency"),
        ({"name": "x", "models": "m1"}, "models"),
        ({"name": "x", "models": [1]}, "models"),
        ({"name": "x", "expires_at": "tomorrow"}, "expires_at"),
        ({"name": "x", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),  # no offset
        ({"name": "x", "expires_at": "2999-01-01"}, "expires_at"),
        ({"name": "x", "expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),  # past
        ({"name": "x", "expires_at": 123}, "expires_at"),
        ({"name": "x", "policy": "nope"}, "policy"),
        ({"name": "x", "rpn": 5}, "rpn"),
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"rpm": 5}, "name"),
        ({"name": "x", "expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),
    ],
)
async def test_bad_create_bodies(http: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    err = assert_error(await http.post("/admin/keys", json=body, headers=AUTH), 400, param)
    assert err["type"] == "invalid_request_error"


async def test_bad_body_shapes(http: httpx.AsyncClient) -> None:
    nested = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for content in (b"{not json", b"[1, 2]", b"", b"\xff\xfe", nested):
        resp = await http.post("/admin/keys", content=content, headers=AUTH)
        assert_error(resp, 400)
    created = await http.post("/admin/keys", json={"name": "y"}, headers=AUTH)
    key_id = created.json()["id"]
    for body, param in (({"disabled": "yes"}, "disabled"), ({"name": None}, "name"),
                        ({"key": "sk-mine"}, "key"), ({"id": "key_other"}, "id"),
                        ({"tpm": -5}, "tpm")):  # fmt: skip
        resp = await http.patch(f"/admin/keys/{key_id}", json=body, headers=AUTH)
        assert_error(resp, 400, param)
