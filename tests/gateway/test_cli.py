"""The `gateway` command: the demo model builder, and `gateway serve` with nothing configured."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from gateway.cli import cli


def test_demo_model_command_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo-model", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    assert (
        MllamaForConditionalGeneration.from_pretrained(tmp_path / "m").config.model_type == "mllama"
    )
    assert AutoProcessor.from_pretrained(tmp_path / "m").tokenizer is not None


def test_serve_with_nothing_configured_runs_the_demo(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_STATE_DIR=str(tmp_path / "state"), GATEWAY_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        body = {
            "model": "meta-llama/llama-3.2-11b-vision-instruct",
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 5,
        }
        # The demo prints a ready key; it is also kept in the state directory.
        demo_key = (tmp_path / "state" / "demo_key").read_text().strip()
        auth = {"Authorization": f"Bearer {demo_key}"}
        resp = httpx.post(base + "/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["role"] == "assistant"
        assert (tmp_path / "state" / "demo-model" / ".demo-model-complete").exists()
        # Graceful shutdown: a stream that is running when SIGTERM arrives still finishes.
        long = {**body, "max_tokens": 300, "stream": True, "temperature": 0}
        events = []
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json=long, headers=auth, timeout=60
        ) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line:
                    events.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            events.extend(line for line in lines if line)
        assert events[-1] == "data: [DONE]"
        assert any('"finish_reason":"' in e for e in events)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    # uvicorn re-raises SIGTERM after its graceful shutdown completes.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    # The demo banner tells the user how to try it, with the key.
    assert "curl" in output
    assert f"Bearer {demo_key}" in output
