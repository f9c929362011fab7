"""The gateway's small exception hierarchy.

Every failure that reaches a client is one of these; `gateway.app` turns them into the OpenAI
error envelope in one place (`error_response`).
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """An error with an HTTP status and the OpenAI envelope fields."""

    status_code: int = 500
    error_type: str | None = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if error_type is not None:
            self.error_type = error_type
        self.headers = headers or {}
        self.extra = extra or {}

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        body.update(self.extra)
        return {"error": body}


class InvalidRequest(GatewayError):
    """400: the request is malformed or asks for something we do not do."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    """429; `error_type` names the limit: requests, tokens or concurrency."""

    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    """503: the engine, Redis or another dependency cannot serve now."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class KeyConflict(GatewayError):
    """409: what the request would create exists already (an imported API key)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"
