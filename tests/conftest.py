"""Shared fixtures: the tiny demo model (real Mllama architecture) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app: object) -> None:
        import socket

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)  # type: ignore[arg-type]
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
    from gateway.settings import Settings

    return Settings(
        model_path=demo_model_dir,
        state_dir=tmp_path_factory.mktemp("state"),
        device="cpu",
        max_batch_size=4,
        default_max_tokens=16,
    )


@pytest.fixture(scope="session")
def live_gateway(gateway_settings):  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    with LiveServer(create_app(gateway_settings)) as server:
        yield server
