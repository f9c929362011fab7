"""The fast engine (slot KV cache, continuous batching) behind the whole gateway."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import AUTH, TEST_API_KEY, LiveServer, wait_until_ready

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
LONG = [{"role": "user", "content": "Long answer please"}]  # greedy: runs to max_tokens


@pytest.fixture(scope="module")
def fast_gateway(
    gateway_settings: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    from gateway.app import create_app

    settings = gateway_settings.model_copy(
        update={
            "engine": "fast",
            "engine_max_slots": 1,
            "engine_max_waiting": 0,
            "engine_cache_gib": 0.05,
            "context_length": 1024,
            "state_dir": tmp_path_factory.mktemp("state"),
        }
    )
    with LiveServer(create_app(settings)) as server:
        wait_until_ready(server.base_url)
        yield server


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (80, 50), (30, 160, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_text_and_image_through_the_fast_engine(fast_gateway: LiveServer) -> None:
    client = openai.OpenAI(
        base_url=fast_gateway.base_url + "/v1", api_key=TEST_API_KEY, max_retries=0
    )
    text = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert text.choices[0].finish_reason in ("stop", "length")
    assert text.usage is not None and 0 < text.usage.completion_tokens <= 6
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png()}},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    chunks = list(streamed)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_request_that_does_not_fit_gets_503_not_a_crash(fast_gateway: LiveServer) -> None:
    url = fast_gateway.base_url + "/v1/chat/completions"
    long = {"model": MODEL, "messages": LONG, "max_tokens": 600, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=long, headers=AUTH, timeout=60) as first:
        lines = first.iter_lines()  # keep it referenced: a collected iterator closes the socket
        next(lines)
        # The only slot is busy and nothing may wait: refused, with a retry hint.
        second = httpx.post(
            url, json={**long, "stream": False, "max_tokens": 4}, headers=AUTH, timeout=30
        )
        assert second.status_code == 503, second.text
        assert second.json()["error"]["code"] == "engine_overloaded"
        assert second.headers["retry-after"] == "1"
    ok = httpx.post(url, json={**long, "stream": False, "max_tokens": 4}, headers=AUTH, timeout=30)
    for _ in range(50):
        if ok.status_code == 200:
            break
        ok = httpx.post(
            url, json={**long, "stream": False, "max_tokens": 4}, headers=AUTH, timeout=30
        )
    assert ok.status_code == 200  # the slot came back once the first client left


def test_a_request_that_can_never_fit_gets_400_not_503(fast_gateway: LiveServer) -> None:
    """While the only slot is busy, a request larger than the engine can ever hold is the
    client's to change (400, no retry hint); one that fits later is still 503 to retry."""
    url = fast_gateway.base_url + "/v1/chat/completions"
    long = {"model": MODEL, "messages": LONG, "max_tokens": 600, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=long, headers=AUTH, timeout=60) as first:
        lines = first.iter_lines()  # keep it referenced: a collected iterator closes the socket
        next(lines)
        never = httpx.post(
            url, json={**long, "stream": False, "max_tokens": 5000}, headers=AUTH, timeout=30
        )
        assert never.status_code == 400, never.text
        assert never.json()["error"]["code"] == "context_length_exceeded"
        assert "retry-after" not in never.headers
        later = httpx.post(
            url, json={**long, "stream": False, "max_tokens": 4}, headers=AUTH, timeout=30
        )
        assert later.status_code == 503, later.text
        assert later.json()["error"]["code"] == "engine_overloaded"
        assert later.headers["retry-after"] == "1"
