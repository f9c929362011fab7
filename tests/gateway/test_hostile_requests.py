"""Malformed and hostile requests: each gets the right 4xx in the OpenAI envelope, never a 5xx."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import AUTH, LiveServer, wait_until_ready

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"


def png(size: tuple[int, int] = (32, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 99, 199)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def with_image(url: str, text: str = "what is it?") -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": text},
                ],
            }
        ],
        "max_tokens": 2,
    }


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    body.update(fields)
    return body


def user(content: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": content}])


NESTED = "[" * 5000 + "]" * 5000

# (case id, body (dict -> JSON, bytes -> raw), status, expected error.code, expected error.param)
CASES: list[tuple[str, Any, int, str | None, str | None]] = [
    ("bad json", b'{"model": ', 400, "invalid_json", None),
    ("not utf-8", b'{"model": "\xff\xfe"}', 400, "invalid_json", None),
    ("json array body", b"[1, 2]", 400, "invalid_type", None),
    ("deeply nested json", ('{"model": ' + NESTED + "}").encode(), 400, None, None),
    (
        "missing model",
        {"messages": [{"role": "user", "content": "hi"}]},
        400,
        "missing_required_parameter",
        "model",
    ),
    ("missing messages", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("empty messages", chat(messages=[]), 400, "invalid_value", "messages"),
    ("messages is a string", chat(messages="hi"), 400, "invalid_value", "messages"),
    (
        "unknown role",
        chat(messages=[{"role": "robot", "content": "hi"}]),
        400,
        "invalid_value",
        "messages[0].role",
    ),
    (
        "tool role",
        chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
        400,
        "invalid_value",
        "messages[0].role",
    ),
    ("content is a number", user(42), 400, "invalid_value", "messages[0].content"),
    ("content is null", user(None), 400, "invalid_value", "messages[0].content"),
    ("content is empty list", user([]), 400, "invalid_value", "messages[0].content"),
    (
        "unknown part type",
        user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
        400,
        None,
        None,
    ),
    ("image part without url", user([{"type": "image_url", "image_url": {}}]), 400, None, None),
    ("temperature is a string", chat(temperature="hot"), 400, "invalid_value", "temperature"),
    ("temperature too high", chat(temperature=5), 400, "invalid_value", "temperature"),
    ("top_p zero", chat(top_p=0), 400, "invalid_value", "top_p"),
    ("n too large", chat(n=9), 400, "invalid_value", "n"),
    ("n zero", chat(n=0), 400, "invalid_value", "n"),
    ("max_tokens zero", chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max_tokens as string", chat(max_tokens="10"), 400, "invalid_value", "max_tokens"),
    ("seed is a float", chat(seed=1.5), 400, "invalid_value", "seed"),
    ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop"),
    ("empty stop string", chat(stop=[""]), 400, "invalid_value", "stop"),
    (
        "presence penalty out of range",
        chat(presence_penalty=3),
        400,
        "invalid_value",
        "presence_penalty",
    ),
    (
        "tool_choice without tools",
        chat(tool_choice="required"),
        400,
        "invalid_value",
        "tool_choice",
    ),
    (
        "tool call arguments that are not a JSON object",
        chat(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "[1]"},
                        }
                    ],
                },
            ]
        ),
        400,
        "invalid_value",
        "messages[1].tool_calls[0].function.arguments",
    ),
    ("top_logprobs without logprobs", chat(top_logprobs=3), 400, "invalid_value", "top_logprobs"),
    (
        "too many top_logprobs",
        chat(logprobs=True, top_logprobs=21),
        400,
        "invalid_value",
        "top_logprobs",
    ),
    (
        "unknown response format",
        chat(response_format={"type": "yaml"}),
        400,
        "invalid_value",
        "response_format.type",
    ),
    (
        "json_schema without a schema spec",
        chat(response_format={"type": "json_schema"}),
        400,
        "missing_required_parameter",
        "response_format.json_schema",
    ),
    (
        "json_schema with a feature that cannot be enforced",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": {"type": "array", "uniqueItems": True}},
            }
        ),
        400,
        "invalid_json_schema",
        "response_format.json_schema.schema",
    ),
    ("logit bias", chat(logit_bias={"42": 5}), 400, "unsupported_parameter", "logit_bias"),
    (
        "stream_options without stream",
        chat(stream_options={"include_usage": True}),
        400,
        "invalid_value",
        "stream_options",
    ),
    (
        "image in system message",
        chat(
            messages=[
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": png()}}]},
                {"role": "user", "content": "hi"},
            ]
        ),
        400,
        "invalid_value",
        "messages[0].content",
    ),
    (
        "too many messages",
        chat(messages=[{"role": "user", "content": "x"}] * 300),
        400,
        "too_many_messages",
        "messages",
    ),
    ("context exceeded", chat(max_tokens=10_000_000), 400, "context_length_exceeded", "messages"),
    ("unknown model", chat(model="gpt-9"), 404, "model_not_found", "model"),
    ("bad base64", with_image("data:image/png;base64,@@@not-base64@@@"), 400, None, "messages"),
    (
        "text data url",
        with_image("data:text/plain;base64," + base64.b64encode(b"hello").decode()),
        400,
        None,
        "messages",
    ),
    (
        "svg data url",
        with_image("data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode()),
        400,
        None,
        "messages",
    ),
    (
        "not an image",
        with_image("data:image/png;base64," + base64.b64encode(b"GIF? no, text").decode()),
        400,
        None,
        "messages",
    ),
    ("pixel bomb", with_image(png((9000, 6000))), 400, None, "messages"),
    (
        "two images (cap 1)",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png()}},
                        {"type": "image_url", "image_url": {"url": png()}},
                    ],
                }
            ]
        ),
        400,
        "too_many_images",
        "messages",
    ),
    ("ssrf loopback", with_image("http://127.0.0.1:1/x.png"), 400, None, "messages"),
    (
        "ssrf metadata",
        with_image("http://169.254.169.254/latest/meta-data/"),
        400,
        None,
        "messages",
    ),
    ("ssrf ipv6 loopback", with_image("http://[::1]/x.png"), 400, None, "messages"),
    ("ssrf private", with_image("http://10.1.2.3/x.png"), 400, None, "messages"),
    ("ssrf localhost name", with_image("http://localhost/x.png"), 400, None, "messages"),
    ("ssrf decimal ip", with_image("http://2130706433/x.png"), 400, None, "messages"),
    ("file scheme", with_image("file:///etc/passwd"), 400, None, "messages"),
    ("ftp scheme", with_image("ftp://example.com/x.png"), 400, None, "messages"),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_request(
    live_gateway, body: Any, status: int, code: str | None, param: str | None
) -> None:  # type: ignore[no-untyped-def]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(
        live_gateway.base_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **AUTH},
        timeout=30,
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert resp.headers["x-request-id"]


def test_neutral_values_of_unsupported_parameters_are_accepted(live_gateway) -> None:  # type: ignore[no-untyped-def]
    body = chat(logprobs=False, tools=[], response_format={"type": "text"}, some_future_field=1)
    resp = httpx.post(
        live_gateway.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"


def test_nul_and_odd_text_is_served(live_gateway) -> None:  # type: ignore[no-untyped-def]
    body = user("nul \u0000 rtl \u202e emoji \U0001f600 <|eot_id|> <|image|>")
    resp = httpx.post(
        live_gateway.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30
    )
    assert resp.status_code == 200, resp.text


def test_body_over_the_cap_is_413(gateway_settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.app import create_app

    settings = gateway_settings.model_copy(update={"max_body_bytes": 2048, "state_dir": tmp_path})
    with LiveServer(create_app(settings)) as server:
        wait_until_ready(server.base_url)
        url = server.base_url + "/v1/chat/completions"
        resp = httpx.post(url, json=user("x" * 5000), headers=AUTH, timeout=30)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large"
        ok = httpx.post(url, json=user("small"), headers=AUTH, timeout=30)
        assert ok.status_code == 200
