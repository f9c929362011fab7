"""`GET /workbench`: the policy editors' page, static files shipped in the package.

The page is plain HTML, CSS and JS (gateway/static/workbench/), loads nothing from outside and
runs under a strict Content-Security-Policy (scripts and styles from this origin only, no inline
script, no framing). It holds no secret: every call it makes goes to the admin API with the
admin token the user typed (kept in the tab's sessionStorage). Off (404, like the admin API)
when GATEWAY_ADMIN_TOKEN is unset.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from gateway.errors import NotFound
from gateway.services import SettingsDep

router = APIRouter(include_in_schema=False)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "workbench.js": "text/javascript; charset=utf-8",
    "workbench.css": "text/css; charset=utf-8",
}


@cache
def asset(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", "workbench", name).read_bytes()


async def enabled(settings: SettingsDep) -> None:
    """Dependency: 404 when the admin API (and so the workbench) is off."""
    if not settings.admin_token:
        raise NotFound(
            "The workbench is off because the admin API is disabled: set GATEWAY_ADMIN_TOKEN.",
            code="admin_disabled",
        )


def _serve(name: str) -> Response:
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }
    return Response(asset(name), media_type=_TYPES[name], headers=headers)


@router.get("/workbench", dependencies=[Depends(enabled)])
async def page() -> Response:
    return _serve("index.html")


@router.get("/workbench/static/{name}", dependencies=[Depends(enabled)])
async def static(name: str) -> Response:
    if name not in _TYPES or name == "index.html":
        raise NotFound("Not found.")
    return _serve(name)
