"""The workbench page as served: off with the admin API, a strict CSP, nothing from outside,
no inline script, and its files shipped as package data."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ("index.html", "workbench.js", "workbench.css")


def client(gateway_settings: Any, **update: Any) -> TestClient:
    from gateway.app import create_app

    # No `with`: the lifespan (engine, Redis) is not needed to serve static files.
    return TestClient(create_app(gateway_settings.model_copy(update=update)))


def test_off_when_the_admin_api_is_off(gateway_settings: Any) -> None:
    c = client(gateway_settings, admin_token=None)
    for path in ("/workbench", "/workbench/static/workbench.js"):
        resp = c.get(path)
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize("name", ASSETS)
def test_served_with_a_strict_csp(gateway_settings: Any, name: str) -> None:
    c = client(gateway_settings)
    path = "/workbench" if name == "index.html" else f"/workbench/static/{name}"
    resp = c.get(path)
    assert resp.status_code == 200
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert c.get("/workbench/static/../app.py").status_code == 404
    assert c.get("/workbench/static/other.js").status_code == 404


def test_nothing_from_outside_and_no_inline_script() -> None:
    html = resources.files("gateway").joinpath("static/workbench/index.html").read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all(
        'src="/workbench/static/' in attrs and not body.strip() for attrs, body in scripts
    )
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for name in ASSETS:
        text = resources.files("gateway").joinpath("static/workbench", name).read_text()
        # The only absolute URL is the SVG namespace (an identifier, never fetched).
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert urls == set(), (name, urls)
        assert "localStorage" not in text and "document.cookie" not in text


def test_assets_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["gateway"]
    shipped = {p.name for p in (ROOT / "gateway/static/workbench").iterdir()}
    assert shipped == set(ASSETS)
    for name in ASSETS:
        assert any(Path("static/workbench", name).match(p) for p in patterns), name


def test_metrics_label_the_workbench_and_audit_routes() -> None:
    from gateway.middleware import _route_label

    assert _route_label("/workbench/static/workbench.js") == "/workbench"
    assert _route_label("/admin/audit/summary") == "/admin/audit"
    assert _route_label("/admin/policies/default/source") == "/admin/policies"
