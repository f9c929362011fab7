"""A gateway configured with a routes file, in front of a mock OpenAI upstream on loopback:
routing, moderation of upstream streams, upstream errors, usage into the rate limiter."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import Settings
from tests.conftest import REDIS_URL, TEST_ADMIN_TOKEN, TEST_API_KEY, LiveServer, wait_until_ready
from tests.gateway.conftest import copy_project_policies
from tests.model.test_upstream import WORDS, MockServer

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}

ROUTES = """\
routes:
  - model: fast-model
    aliases: [Fast]
    api_base: {base}
    upstream_model: ok
  - model: broken-model
    api_base: {base}
    upstream_model: fail500
    retries: 0
  - model: guarded-model
    api_base: {base}
    upstream_model: ok
    policy: no-world
  - model: dropping-model
    api_base: {base}
    upstream_model: drop_after_first
    retries: 0
  - model: slow-unguarded
    api_base: {base}
    upstream_model: slow
    policy: input-only
  - model: fast-unguarded
    api_base: {base}
    upstream_model: ok
    policy: input-only
  - model: slow-guarded
    api_base: {base}
    upstream_model: slow
    policy: no-world
  - model: tools-model
    api_base: {base}
    upstream_model: toolcalls
"""

INPUT_ONLY = """\
name: input-only
version: "1"
guards:
  blocklist: {stages: [input]}
custom_blocklists:
  - {name: canary, terms: [GATEWAY-CANARY-BLOCK], stage: input, action: block}
"""

NO_WORLD = """\
name: no-world
version: "1"
guards:
  blocklist: {stages: [input, output]}
defaults: {threshold: medium, action: block}
custom_blocklists:
  - name: world
    terms: [world]
    stage: output
    action: block
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from gateway.app import create_app

    root = tmp_path_factory.mktemp("routes")
    policies = root / "policies"
    policies.mkdir()
    copy_project_policies(policies)
    (policies / "no-world.yaml").write_text(NO_WORLD)
    (policies / "input-only.yaml").write_text(INPUT_ONLY)
    with MockServer() as mock:
        routes = root / "routes.yaml"
        routes.write_text(ROUTES.format(base=mock.base_url))
        settings = Settings(
            routes_file=routes,
            policy_dir=policies,
            state_dir=root / "state",
            redis_url=REDIS_URL,
            redis_key_prefix=f"gwtest-routes-{secrets.token_hex(4)}",
            bootstrap_key=TEST_API_KEY,
            admin_token=TEST_ADMIN_TOKEN,
        )
        with LiveServer(create_app(settings)) as server:
            wait_until_ready(server.base_url)
            yield server


def sdk(server: LiveServer, key: str = TEST_API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def test_models_lists_every_route_and_no_local_model(gateway: LiveServer) -> None:
    ids = [m.id for m in sdk(gateway).models.list().data]
    assert ids[:4] == ["fast-model", "broken-model", "guarded-model", "dropping-model"]
    assert sdk(gateway).models.retrieve("fast").id == "fast-model"  # alias, any case


def test_alias_routes_to_the_upstream(gateway: LiveServer) -> None:
    resp = sdk(gateway).chat.completions.create(
        model="Fast", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert resp.model == "fast-model"
    assert resp.choices[0].message.content == "".join(WORDS)
    # No Llama Guard here: hate is not judged, and says so by carrying no severity.
    assert resp.model_dump()["choices"][0]["content_filter_results"]["hate"] == {"filtered": False}


def test_blocked_upstream_stream_ends_with_content_filter_and_leaks_nothing(
    gateway: LiveServer,
) -> None:
    stream = sdk(gateway).chat.completions.create(
        model="guarded-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
    )
    chunks = list(stream)
    sent = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "world" not in sent
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    resp = sdk(gateway).chat.completions.create(
        model="guarded-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.choices[0].finish_reason == "content_filter"
    assert resp.choices[0].message.content == ""


def test_upstream_failure_maps_to_503(gateway: LiveServer) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gateway).chat.completions.create(
            model="broken-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 503
    body: Any = err.value.body
    assert body["code"] == "upstream_unavailable"


def test_streamed_upstream_failure_before_the_first_token_is_an_http_error(
    gateway: LiveServer,
) -> None:
    # The gateway waits for the engine's first event before it starts the SSE response, so a
    # failure before any text is a real 503 (not a 200 whose stream carries the error).
    body = {"model": "broken-model", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    url = gateway.base_url + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=auth) as resp:
        resp.read()
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert error["type"] == "server_error"
    assert "engine exploded" in error["message"]
    assert resp.headers["x-request-id"]
    assert resp.headers["x-policy"].startswith("default; version=")
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gateway).chat.completions.create(**body, stream=True)  # type: ignore[call-overload]
    assert err.value.status_code == 503
    # Nothing is left behind: the same key goes on streaming from a working route.
    stream = sdk(gateway).chat.completions.create(
        model="fast-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    sent = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert sent == "".join(WORDS)


def test_streamed_upstream_failure_after_the_first_token_ends_with_an_error_event(
    gateway: LiveServer,
) -> None:
    # Once the engine produced text the response starts (200 for good), so a failure after
    # it comes as the last event. (The default policy holds the text back until it is checked;
    # what was held back when the upstream dropped is never sent.)
    body = {
        "model": "dropping-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    url = gateway.base_url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=auth) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("choices" in c for c in chunks[:-1])
    assert chunks[-1]["error"]["code"] == "engine_error"


def test_upstream_usage_settles_the_rate_limiter(gateway: LiveServer) -> None:
    created = httpx.post(
        gateway.base_url + "/admin/keys", json={"name": "u", "tpm": 10_000}, headers=ADMIN
    )
    assert created.status_code == 201
    auth = {"Authorization": f"Bearer {created.json()['key']}"}
    body = {
        "model": "fast-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 50,
    }
    url = gateway.base_url + "/v1/chat/completions"
    first = httpx.post(url, json=body, headers=auth)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    # The upstream's own usage: 5 + 2 in its whole (non-streamed) answer, which is what a
    # non-streaming request fetches (its SSE stream would say 11 + 3).
    assert used == 7
    import time

    time.sleep(0.3)  # settlement runs right after the response
    second = httpx.post(url, json=body, headers=auth)
    remaining_first = int(first.headers["x-ratelimit-remaining-tokens"])
    remaining_second = int(second.headers["x-ratelimit-remaining-tokens"])
    # The first request's reservation was replaced by its real usage.
    assert remaining_first - remaining_second == used


def test_upstream_usage_with_an_image_is_the_upstreams_own_count(gateway: LiveServer) -> None:
    """The local engines count an image as one placeholder, which the gateway swaps for its
    vision tokens; an upstream's usage already is its own count and is reported unchanged."""
    from tests.gateway.test_e2e_openai import png_data_url

    content = [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "hi"},
    ]
    body = {"model": "fast-model", "messages": [{"role": "user", "content": content}]}
    resp = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json={**body, "max_tokens": 50},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
    )
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 2)  # the mock's answer


def _first_content_s(gateway: LiveServer, model: str) -> tuple[float, str]:
    """Seconds to the first chunk with text from a route whose upstream sends an "x" every
    20 ms for 2 s (no sentence boundary), and the whole text."""
    import time

    started = time.perf_counter()
    stream = sdk(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    first, text = None, ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            text += chunk.choices[0].delta.content
    assert first is not None
    return first, text


def test_a_policy_without_output_guards_holds_no_text_back(gateway: LiveServer) -> None:
    first, text = _first_content_s(gateway, "slow-unguarded")
    assert first < 1.0 and text == "x" * 100  # sent as it came, not after the whole stream
    # With an output guard, text without a boundary is held (up to the window) for checks.
    first, text = _first_content_s(gateway, "slow-guarded")
    assert first > 1.5 and text == "x" * 100


def _http_chunks(gateway: LiveServer, body: dict[str, Any]) -> list[bytes]:
    """POST and return the response body's HTTP/1.1 chunks as sent (one per write)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(gateway.base_url)
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {url.netloc}\r\n"
        f"authorization: Bearer {TEST_API_KEY}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + payload)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    headers, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in headers.lower()
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2 :]


def test_stream_events_ready_together_leave_in_one_write(gateway: LiveServer) -> None:
    """A burst (role chunk and first text; finish, usage and [DONE]) is one write, while text
    that comes over time is sent as it comes."""
    body = {
        "model": "fast-unguarded",  # no output guard: each word is sent as it comes
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = _http_chunks(gateway, body)
    events = b"".join(chunks).count(b"data: ")
    assert _streamed_text(chunks) == "Hello world"
    # role, the 3 words (merged when they reach the gateway in one read), finish, usage, [DONE]
    assert 5 <= events <= 7, chunks
    assert len(chunks) < events, chunks  # not one write per event
    assert b'"role":"assistant"' in chunks[0] and b'"content":"Hel' in chunks[0]
    assert chunks[-1].endswith(b"data: [DONE]\n\n") and b'"usage":{' in chunks[-1]
    slow = _http_chunks(gateway, {**body, "model": "slow-unguarded"})
    assert _streamed_text(slow) == "x" * 100 and len(slow) > 50


def _streamed_text(chunks: list[bytes]) -> str:
    events = b"".join(chunks).split(b"\n\n")
    data = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    return "".join(d["choices"][0]["delta"].get("content") or "" for d in data if d["choices"])


def test_upstream_tool_calls_and_logprobs_pass_through(gateway: LiveServer) -> None:
    tools: Any = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("a", "b")
    ]
    ask: Any = [{"role": "user", "content": "hi"}]
    resp = sdk(gateway).chat.completions.create(
        model="tools-model", messages=ask, tools=tools, max_tokens=20
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    with sdk(gateway).chat.completions.stream(
        model="tools-model", messages=ask, tools=tools, max_tokens=20, logprobs=True
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["a", "b"]
    assert choice.message.content == "Hi"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [t.token for t in choice.logprobs.content] == ["Hi"]
