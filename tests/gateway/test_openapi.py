"""The OpenAPI document describes the public API as it really is, and a property-based fuzz of
that API from the document (schemathesis over the real server): never a 5xx, every error in
the OpenAI envelope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.app import create_app
from gateway.protocol import ChatCompletionRequest
from gateway.settings import Settings
from tests.conftest import AUTH

CHAT = "/v1/chat/completions"
FUZZ_CASES = 300


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # Building the document needs no engine, Redis or lifespan: an app that never starts.
    settings = Settings(
        model_path=Path("/nonexistent"), state_dir=tmp_path_factory.mktemp("openapi")
    )
    return create_app(settings).openapi()


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    return dict(document["components"]["schemas"][ref.rsplit("/", 1)[-1]])


def test_chat_request_body_is_the_real_request_model(document: dict[str, Any]) -> None:
    operation = document["paths"][CHAT]["post"]
    body = operation["requestBody"]
    assert body["required"] is True
    schema = resolve(document, body["content"]["application/json"]["schema"])
    # The fields and constraints are those of the model that parses the requests.
    assert set(schema["properties"]) == set(ChatCompletionRequest.model_fields)
    assert {"model", "messages", "max_tokens", "stream", "stream_options", "n"} <= set(
        schema["properties"]
    )
    assert schema["required"] == ["model", "messages"]
    n = next(s for s in schema["properties"]["n"]["anyOf"] if s.get("type") == "integer")
    assert (n["minimum"], n["maximum"]) == (1, 8)
    message = resolve(document, schema["properties"]["messages"]["items"])
    roles = ["system", "developer", "user", "assistant", "tool"]
    assert message["properties"]["role"]["enum"] == roles
    parts = message["properties"]["content"]["anyOf"][1]["items"]["oneOf"]
    part_names = {p["$ref"].rsplit("/", 1)[-1] for p in parts}
    assert part_names == {"TextContentPart", "ImageContentPart"}
    image = resolve(document, document["components"]["schemas"]["ImageContentPart"])
    assert resolve(document, image["properties"]["image_url"])["required"] == ["url"]
    # Every ref in the document resolves (code generators choke on a dangling one).
    for name in {r.rsplit("/", 1)[-1] for r in _refs(document)}:
        assert name in document["components"]["schemas"], name


def test_v1_routes_declare_bearer_auth_and_envelope_errors(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            assert operation["security"] == [{"bearerAuth": []}], (path, method)
            responses = operation["responses"]
            assert "422" not in responses, (path, method)  # validation errors are 400 here
            for status in ("401", "503"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (path, method, status)
    chat = document["paths"][CHAT]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"400", "401", "403", "404", "413", "429", "503"} <= set(chat)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


# -- fuzz ------------------------------------------------------------------------------------
def header(resp: Any, name: str) -> str | None:
    """A header of schemathesis' response (its headers map names to lists of values)."""
    for key, values in resp.headers.items():
        if key.lower() == name:
            return str(values[0]) if isinstance(values, list) else str(values)
    return None


def check_response(resp: Any, case: Any) -> None:
    """Never a 5xx; errors in the OpenAI envelope; successes shaped as promised."""
    where = f"{case.method} {case.path} {case.body!r:.500} -> {resp.status_code} {resp.text:.500}"
    assert resp.status_code < 500, where
    assert header(resp, "x-request-id"), where
    content_type = header(resp, "content-type") or ""
    if resp.status_code >= 400:
        assert content_type.startswith("application/json"), where
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"], where
        assert {"type", "param", "code"} <= set(error), where
        return
    if case.path == CHAT and case.method == "POST":
        if content_type.startswith("text/event-stream"):
            events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", where
            for event in events[:-1]:
                assert json.loads(event)["object"] == "chat.completion.chunk", where
        else:
            assert resp.json()["object"] == "chat.completion", where


@pytest.fixture(scope="module")
def public_api(live_gateway: Any) -> Any:
    document = httpx.get(live_gateway.base_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    # The public API: /v1 and health (the admin API is the operator's, tested on its own).
    return schema.exclude(path_regex="^/(admin|workbench|metrics)")


def test_fuzz_public_api_never_5xx_always_envelope(live_gateway: Any, public_api: Any) -> None:
    """Schema-valid and schema-violating cases against every public operation; half the chat
    bodies name the served model, so that valid ones reach the engine and the guards."""
    served = live_gateway.base_url
    model_id = httpx.get(served + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
    positive = public_api.as_strategy(GenerationMode.POSITIVE, headers=dict(AUTH))
    negative = public_api.as_strategy(GenerationMode.NEGATIVE, headers=dict(AUTH))
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(positive, negative), served_model=st.booleans())
    def fuzz(case: Any, served_model: bool) -> None:
        if served_model and case.path == CHAT and isinstance(case.body, dict):
            case.body["model"] = model_id
            # Bounded work per case: up to 8 choices of up to 64 tokens (not 8 x 2,000).
            for name in ("max_tokens", "max_completion_tokens"):
                value = case.body.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 64:
                    case.body[name] = 64
        resp = case.call(base_url=served, session=session, timeout=120)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        check_response(resp, case)

    fuzz()
    print("fuzz statuses:", dict(sorted(seen.items())))
    # The fuzz reached both sides: answers and refusals (else it tested nothing).
    assert seen.get(200, 0) > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0, seen
