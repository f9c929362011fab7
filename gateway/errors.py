"""Every error a client can get, and the one table that turns an exception into its response.

The gateway's own exceptions (`GatewayError` and its subclasses) live here; the model side
raises its own (`model.errors`), which say nothing about HTTP. `ERRORS` maps each class to its
status, envelope `type` and `code`, looked up along the exception's MRO (the most specific
class wins); an instance may still name its own `code`, `type` or `status` (a rate limit names
its limit as the type). `as_gateway_error` applies the table to any exception, and
`gateway.app.exception_response` is the one handler that sends the result.

A 500 never shows the exception's text: `server_failure` logs the cause with the request id and
tells the client only that id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from model.errors import (
    EngineOverloaded,
    InputRejected,
    ModelError,
    RequestNeverFits,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = structlog.get_logger(__name__)


class GatewayError(Exception):
    """An error the client sees as it is: the message, and the envelope fields of `ERRORS`."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        kind = error_kind(type(self))
        self.code = code if code is not None else kind.code
        self.error_type = error_type if error_type is not None else kind.type
        self.status_code = status if status is not None else kind.status
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
    """The request is malformed or asks for something we do not do."""


class AuthenticationFailed(GatewayError):
    pass


class PermissionDenied(GatewayError):
    pass


class NotFound(GatewayError):
    pass


class ModelNotFound(NotFound):
    pass


class RequestTooLarge(GatewayError):
    """The request's body is over the gateway's byte limit (not the model's context)."""


class RateLimited(GatewayError):
    """`error_type` names the limit: requests, tokens or concurrency."""


class ServiceUnavailable(GatewayError):
    """The engine, Redis or another dependency cannot serve now."""


class KeyConflict(GatewayError):
    """What the request would create exists already (an imported API key)."""


class PolicyConflict(GatewayError):
    """The policy file changed since the editor read it (its etag)."""


class PolicyDirReadOnly(GatewayError):
    """The policy directory is not ours to write (a ConfigMap)."""


class EngineFailed(GatewayError):
    """The server failed while generating (built by `server_failure`, never with its cause)."""


class ContentFiltered(GatewayError):
    """Azure's body: `type` null, `code` content_filter, `param` prompt, innererror."""

    def __init__(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(str(body["error"].get("message", "")), param="prompt", headers=headers)
        self._body = body

    def envelope(self) -> dict[str, Any]:
        return self._body


@dataclass(frozen=True)
class ErrorKind:
    """How the client sees one class of error."""

    status: int
    type: str | None
    code: str | None
    # A 503 that a retry in a second can fix sends `retry-after: 1`.
    retry_after: bool = False
    # For a model-side exception: the client's message, `{}` being the exception's own text
    # (ours, never the prompt's). Unused for a 500, whose text is never shown.
    message: str = "{}"
    param: str | None = None  # the request field at fault, for a model-side 4xx


_INVALID = "invalid_request_error"

# The one map from exception to response; looked up along the MRO, so a subclass not listed
# gets its nearest listed base.
ERRORS: dict[type[BaseException], ErrorKind] = {
    # The gateway's own.
    GatewayError: ErrorKind(500, "server_error", None),
    InvalidRequest: ErrorKind(400, _INVALID, None),
    ContentFiltered: ErrorKind(400, None, "content_filter"),
    AuthenticationFailed: ErrorKind(401, "authentication_error", "invalid_api_key"),
    PermissionDenied: ErrorKind(403, "permission_error", "model_not_allowed"),
    PolicyDirReadOnly: ErrorKind(403, "permission_error", "policy_dir_read_only"),
    NotFound: ErrorKind(404, _INVALID, "not_found"),
    ModelNotFound: ErrorKind(404, _INVALID, "model_not_found"),
    KeyConflict: ErrorKind(409, _INVALID, "conflict"),
    PolicyConflict: ErrorKind(409, _INVALID, "policy_conflict"),
    RequestTooLarge: ErrorKind(413, _INVALID, "request_too_large"),
    RateLimited: ErrorKind(429, "requests", "rate_limit_exceeded"),
    EngineFailed: ErrorKind(500, "server_error", "engine_error"),
    ServiceUnavailable: ErrorKind(503, "server_error", "service_unavailable"),
    # The model side's (`model.errors`).
    # ModelError and EngineError (and HTTPError, which the upstream engine wraps): a 500
    # through `server_failure`, so their text is never sent.
    ModelError: ErrorKind(500, "server_error", "engine_error"),
    # Never retryable: the same request can never fit, so the client must change it.
    RequestNeverFits: ErrorKind(
        400,
        _INVALID,
        "context_length_exceeded",
        message="The request is larger than this model's engine can ever hold: {}. Reduce "
        "the length of the messages, max_tokens or the number of images.",
        param="messages",
    ),
    InputRejected: ErrorKind(400, _INVALID, "invalid_model_input", param="messages"),
    EngineOverloaded: ErrorKind(
        503,
        "server_error",
        "engine_overloaded",
        retry_after=True,
        message="The model engine is at capacity ({}); retry shortly.",
    ),
    UpstreamError: ErrorKind(502, "server_error", "upstream_error"),
    UpstreamBadResponse: ErrorKind(502, "server_error", "upstream_bad_response"),
    UpstreamUnavailable: ErrorKind(503, "server_error", "upstream_unavailable", retry_after=True),
    UpstreamTimeout: ErrorKind(504, "server_error", "upstream_timeout"),
}


def error_kind(cls: type[BaseException]) -> ErrorKind:
    """The entry of `ERRORS` for `cls`: its own, or its nearest listed base's."""
    for base in cls.__mro__:
        kind = ERRORS.get(base)
        if kind is not None:
            return kind
    return ERRORS[GatewayError]


def is_mapped(exc: BaseException) -> bool:
    """A gateway or model error (the table's); anything else is a bug or the client leaving."""
    return isinstance(exc, GatewayError | ModelError)


def as_gateway_error(exc: BaseException) -> GatewayError:
    """Any exception as what the client gets, by `ERRORS`; a 500 through `server_failure`."""
    if isinstance(exc, GatewayError):
        return exc
    kind = error_kind(type(exc)) if isinstance(exc, ModelError) else None
    if kind is None or kind.status == 500:
        return server_failure(exc)
    return GatewayError(
        kind.message.format(exc),
        param=kind.param,
        code=kind.code,
        error_type=kind.type,
        status=kind.status,
        headers={"retry-after": "1"} if kind.retry_after else None,
    )


def with_headers(exc: BaseException, headers: dict[str, str]) -> BaseException:
    """An error after admission carries the admission's headers (x-ratelimit-*, x-policy);
    its own headers win. Other exceptions (the client gone, a bug) pass unchanged."""
    if not is_mapped(exc):
        return exc
    err = as_gateway_error(exc)
    err.headers = {**headers, **err.headers}
    return err


def server_failure(cause: BaseException | str | None) -> EngineFailed:
    """A 500 that says the server failed and names the request; the cause is logged here with
    the request id, and its text is never shown to the client."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if isinstance(cause, BaseException):
        log.error(
            "engine_failed",
            request_id=request_id,
            error_type=type(cause).__name__,
            exc_info=cause,
        )
    else:
        log.error("engine_failed", request_id=request_id, error=cause or "unknown error")
    ref = f" (request id {request_id})" if request_id else ""
    return EngineFailed(
        f"The server failed while generating the completion{ref}. This is not a problem with "
        "your request; retry it, and quote the request id if you contact the operator."
    )
