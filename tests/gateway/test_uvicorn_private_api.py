"""The uvicorn internals that `gateway/http_server.py` relies on, checked one by one so that an
upgrade which moves them fails here with a message saying what moved, rather than as a slower
or broken server. pyproject.toml bounds uvicorn and httptools to the versions checked here;
widen a bound only after this file passes against the new version."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from gateway.http_server import CoalescingHttpToolsProtocol, _CoalescingTransport

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# What uvicorn's HTTP protocol may call on its transport. The first group is intercepted by
# `_CoalescingTransport` (writes are held, so whatever writes or ends the connection must
# pass through it); the second is forwarded as is (reading, flow control, socket info).
INTERCEPTED = {"write", "writelines", "close", "abort", "get_write_buffer_size"}
FORWARDED = {"is_closing", "get_extra_info", "pause_reading", "resume_reading", "set_protocol"}
UVICORN_HTTP_MODULES = (
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.flow_control",
    "uvicorn.protocols.utils",
)


def moved(what: str) -> str:
    version = importlib.metadata.version("uvicorn")
    return (
        f"uvicorn {version}: {what}. gateway/http_server.py subclasses uvicorn's private "
        "HttpToolsProtocol and must be checked against this version (then update this test "
        "and the bound in pyproject.toml), or the bound must stay where it was."
    )


def test_installed_versions_are_within_the_pinned_range() -> None:
    pins = {
        Requirement(dep).name: Requirement(dep)
        for dep in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    }
    for name in ("uvicorn", "httptools"):
        spec = pins[name].specifier
        assert any(s.operator in ("<", "<=", "~=", "==") for s in spec), (
            f"{name} needs an upper bound in pyproject.toml: gateway/http_server.py and "
            "model/http1.py use its internals"
        )
        installed = Version(importlib.metadata.version(name))
        assert installed in spec, f"{name} {installed} is outside pyproject.toml's {spec}"


def test_the_subclassed_protocol_is_where_it_was() -> None:
    try:
        module = importlib.import_module("uvicorn.protocols.http.httptools_impl")
    except ImportError as exc:
        pytest.fail(moved(f"uvicorn.protocols.http.httptools_impl cannot be imported ({exc})"))
    base = getattr(module, "HttpToolsProtocol", None)
    assert isinstance(base, type), moved("httptools_impl has no HttpToolsProtocol class")
    assert issubclass(CoalescingHttpToolsProtocol, base)
    assert issubclass(base, asyncio.Protocol), moved("HttpToolsProtocol is no asyncio.Protocol")

    params = list(inspect.signature(base.connection_made).parameters)
    assert params == ["self", "transport"], moved(
        f"HttpToolsProtocol.connection_made takes {params}, not (self, transport)"
    )
    init = set(inspect.signature(base.__init__).parameters)
    assert {"config", "server_state", "app_state"} <= init, moved(
        f"HttpToolsProtocol.__init__ takes {sorted(init)}"
    )


def test_uvicorn_accepts_the_protocol_class() -> None:
    import uvicorn

    config = uvicorn.Config(_app, http=CoalescingHttpToolsProtocol, log_config=None)
    config.load()
    assert config.http_protocol_class is CoalescingHttpToolsProtocol, moved(
        "Config(http=<a class>) no longer uses that class as the HTTP protocol"
    )


def test_uvicorn_calls_only_known_transport_methods() -> None:
    """A transport method uvicorn starts to call (say `write_eof`) would reach the socket past
    the held writes: it must be added to `_CoalescingTransport` or found harmless."""
    called: set[str] = set()
    for name in UVICORN_HTTP_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        called |= set(re.findall(r"\btransport\.(\w+)\(", source))
    unknown = called - INTERCEPTED - FORWARDED
    assert not unknown, moved(f"its HTTP protocol now calls transport.{sorted(unknown)}")
    assert "write" in called, moved("its HTTP protocol no longer writes through transport.write")
    for method in INTERCEPTED:
        assert method in vars(_CoalescingTransport), f"_CoalescingTransport lacks {method}"


async def test_the_protocol_keeps_the_wrapped_transport_and_the_loop() -> None:
    """The subclass reads `self.loop` (set by uvicorn's __init__) and hands uvicorn a wrapped
    transport, which uvicorn must keep as the one it writes to (`self.transport`)."""
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(_app, http=CoalescingHttpToolsProtocol, log_config=None)
    protocol = CoalescingHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    loop = asyncio.get_running_loop()
    assert getattr(protocol, "loop", None) is loop, moved("HttpToolsProtocol has no `loop`")

    ours, theirs = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, ours)
        kept: Any = getattr(protocol, "transport", None)
        assert isinstance(kept, _CoalescingTransport), moved(
            "connection_made no longer keeps its transport as `self.transport`"
        )
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 65536), 10):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"ok")
        transport.close()
    finally:
        theirs.close()


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})
