"""The model side's exceptions: what an engine (local, fast, upstream, litellm) raises.

They say what went wrong, never how a client sees it: no HTTP status, no envelope code. The
gateway maps each class to its response in one table (`gateway.errors.ERRORS`). Where a class
sits in this tree decides who is at fault, and so whether a retry can help:

    ModelError
    ├── EngineError                 the server's side failed (not the client's fault)
    │   ├── EngineOverloaded        full now: retry shortly
    │   └── UpstreamError           a remote engine failed before the first delta
    │       ├── UpstreamBadResponse     it answered, but not with something usable
    │       ├── UpstreamUnavailable     refused, dropped, 5xx or 429 (worth another try)
    │       └── UpstreamTimeout         no answer in time
    ├── RequestNeverFits            needs more than the engine can ever hold: a retry never helps
    ├── InputRejected               the request's own input cannot be encoded
    └── HTTPError                   `model.http1`'s transport failures (upstream wraps them)
        ├── ConnectTimeout
        ├── ReadTimeout
        └── ConnectionFailed
"""

from __future__ import annotations


class ModelError(Exception):
    """Anything the model side raises on purpose; its message is ours (no prompt text)."""


class EngineError(ModelError):
    """The engine could not take or finish a request (not the client's fault)."""


class EngineOverloaded(EngineError):
    """The engine's queue is full; the same request fits later."""


class RequestNeverFits(ModelError):
    """The request needs more than the engine can ever hold (context or images): unlike
    `EngineOverloaded`, waiting does not help, so it is the client's to change."""


class InputRejected(ModelError, ValueError):
    """The request's own input cannot be encoded: the client's fault (a 400, never a 500).

    The message is ours and safe to show to the client; the cause is logged server-side.
    """


class UpstreamError(EngineError):
    """The upstream failed before the first delta; `retryable`: another try may succeed."""

    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class UpstreamBadResponse(UpstreamError):
    """The upstream answered, but not with something we can use."""


class UpstreamUnavailable(UpstreamError):
    """Connection refused or dropped, 5xx, 429: worth another try before the first token."""

    retryable = True


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (only connect timeouts are retried)."""


class HTTPError(ModelError):
    """A `model.http1` call failed below HTTP: no usable answer."""


class ConnectTimeout(HTTPError):
    """No connection (or no pooled slot) in time; nothing was sent."""


class ReadTimeout(HTTPError):
    """The server went silent for longer than the read timeout."""


class ConnectionFailed(HTTPError):
    """Refused, reset, closed before the answer ended, or an answer that is not HTTP."""
