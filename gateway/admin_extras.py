"""The admin routers beyond API keys, in one list so that `gateway.app` mounts them in one line:
the audit log, the policy workbench's endpoints (dry run, validate, save) and its page."""

from __future__ import annotations

from fastapi import APIRouter


def admin_extras() -> list[APIRouter]:
    from gateway import admin_policies, audit_api, workbench

    return [audit_api.router, admin_policies.router, workbench.router]
