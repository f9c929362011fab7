"""Shared fixtures: the tiny demo model (real Mllama architecture) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# A real Redis: 127.0.0.1:6379 here and in CI (each test session uses its own key prefix).
REDIS_URL = "redis://127.0.0.1:6379/0"
TEST_API_KEY = "sk-test-bootstrap-key-0123456789abcdef"
TEST_ADMIN_TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread, with the HTTP
    protocol that `gateway serve` uses."""

    def __init__(self, app: object, http: type | None = None) -> None:
        import socket

        import uvicorn

        from gateway.http_server import CoalescingHttpToolsProtocol

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,  # type: ignore[arg-type]
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
                http=http or CoalescingHttpToolsProtocol,
            )
        )

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def gateway_settings(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import secrets

    from gateway.settings import Settings

    return Settings(
        model_path=demo_model_dir,
        state_dir=tmp_path_factory.mktemp("state"),
        device="cpu",
        max_batch_size=4,
        default_max_tokens=16,
        redis_url=REDIS_URL,
        redis_key_prefix=f"gwtest-{secrets.token_hex(4)}",
        bootstrap_key=TEST_API_KEY,
        admin_token=TEST_ADMIN_TOKEN,
    )


@pytest.fixture(scope="session")
def live_gateway(gateway_settings):  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    with LiveServer(create_app(gateway_settings)) as server:
        wait_until_ready(server.base_url)
        yield server


def wait_until_ready(base_url: str, timeout: float = 30) -> None:
    """The bootstrap key is registered in the background: wait until it authenticates."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(base_url + "/v1/models", headers=AUTH, timeout=5).status_code == 200:
            return
        time.sleep(0.05)
    raise RuntimeError("the gateway never accepted the test key")
