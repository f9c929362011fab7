"""`GET /admin/audit` and `GET /admin/audit/summary`: reading the audit log (admin token).

Filters (query parameters): `since`, `until` (RFC 3339 time or Unix seconds), `key` (id or
name), `policy`, `category`, `action` (`blocked` or `annotated`), `stage` (`input`, `output`).
`/admin/audit` pages newest first: `limit` (1..500, default 50) and `cursor` (the `next_cursor`
of the previous page). `/admin/audit/summary` counts per category and per action over the
window (default: the last hour), with per-category counts in time buckets for a chart.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from gateway.admin import require_admin
from gateway.audit import AuditFilter, AuditLog
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.services import ServicesDep

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

_CURSOR_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
# A stream id's time part: milliseconds from 0 to below 2^63 (Redis refuses anything else).
_MS_LIMIT = 2**63


async def audit_log(services: ServicesDep) -> AuditLog:
    """Dependency: the app's audit log, or 503 when it is off."""
    log = services.audit
    if log is None:
        raise ServiceUnavailable(
            "The audit log is off (GATEWAY_AUDIT_ENABLED=false).", code="audit_disabled"
        )
    return log


AuditLogDep = Annotated[AuditLog, Depends(audit_log)]


def parse_time_ms(value: str | None, param: str) -> int | None:
    """RFC 3339 (with an offset or Z) or Unix seconds, as milliseconds."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds: float | None = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        return _checked_ms(seconds * 1000, param)
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidRequest(
            f"Invalid value for '{param}': expected an RFC 3339 time such as "
            "'2030-01-01T00:00:00Z' or Unix seconds.",
            param=param,
        )
    return _checked_ms(parsed.timestamp() * 1000, param)


def _checked_ms(ms: float, param: str) -> int:
    """A finite time from the Unix epoch on, that fits a stream id (else 400 naming `param`)."""
    if not math.isfinite(ms) or not 0 <= ms < _MS_LIMIT:
        raise InvalidRequest(
            f"Invalid value for '{param}': the time must be finite, at or after 1970-01-01 "
            "and before the year 292278994.",
            param=param,
        )
    return int(ms)


def audit_filter(params: dict[str, str], *, default_window_s: float | None = None) -> AuditFilter:
    since = parse_time_ms(params.get("since"), "since")
    until = parse_time_ms(params.get("until"), "until")
    if since is None and default_window_s is not None:
        since = int((time.time() - default_window_s) * 1000)
    action = params.get("action") or None
    if action not in (None, "blocked", "annotated"):
        raise InvalidRequest("'action' must be 'blocked' or 'annotated'.", param="action")
    stage = params.get("stage") or None
    if stage not in (None, "input", "output"):
        raise InvalidRequest("'stage' must be 'input' or 'output'.", param="stage")
    return AuditFilter(
        since_ms=since,
        until_ms=until,
        key=params.get("key") or None,
        policy=params.get("policy") or None,
        category=params.get("category") or None,
        action=action,
        stage=stage,
    )


@router.get("/audit")
async def list_audit(request: Request, log: AuditLogDep) -> JSONResponse:
    params = dict(request.query_params)
    where = audit_filter(params)
    cursor = params.get("cursor") or None
    if cursor is not None and not _CURSOR_RE.match(cursor):
        raise InvalidRequest("Invalid 'cursor'.", param="cursor")
    try:
        limit = int(params.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 500:
        raise InvalidRequest("'limit' must be an integer from 1 to 500.", param="limit")
    try:
        entries, next_cursor = await log.query(where, cursor=cursor, limit=limit)
    except RedisError as exc:
        raise _redis_down(exc) from None
    body: dict[str, Any] = {"object": "list", "data": entries, "next_cursor": next_cursor}
    return JSONResponse(body)


@router.get("/audit/summary")
async def audit_summary(request: Request, log: AuditLogDep) -> JSONResponse:
    where = audit_filter(dict(request.query_params), default_window_s=3600)
    try:
        summary = await log.summary(where)
    except RedisError as exc:
        raise _redis_down(exc) from None
    return JSONResponse({"since_ms": where.since_ms, "until_ms": where.until_ms, **summary})


def _redis_down(exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(f"The audit log cannot be read: Redis: {exc or type(exc).__name__}")
