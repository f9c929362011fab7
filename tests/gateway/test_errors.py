"""The one error map (`gateway.errors.ERRORS`): what each exception is for the client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.requests import ClientDisconnect
from transformers import AutoProcessor, MllamaForConditionalGeneration

from gateway.app import exception_response
from gateway.errors import (
    ERRORS,
    AuthenticationFailed,
    ContentFiltered,
    EngineFailed,
    GatewayError,
    InvalidRequest,
    KeyConflict,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    PolicyConflict,
    PolicyDirReadOnly,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    as_gateway_error,
    with_headers,
)
from model.errors import (
    ConnectionFailed,
    EngineError,
    EngineOverloaded,
    InputRejected,
    ModelError,
    RequestNeverFits,
    UpstreamUnavailable,
)
from model.fast.kv_cache import CacheGeometry, plan_slots
from tests.model.fast_support import BLUE, RED, TEXTS, image, make_engine, request, run, stream_of

# What clients saw before the table existed (each class carried its own fields): unchanged.
GATEWAY_ERRORS: list[tuple[type[GatewayError], int, str | None, str | None]] = [
    (GatewayError, 500, "server_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (AuthenticationFailed, 401, "authentication_error", "invalid_api_key"),
    (PermissionDenied, 403, "permission_error", "model_not_allowed"),
    (PolicyDirReadOnly, 403, "permission_error", "policy_dir_read_only"),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (KeyConflict, 409, "invalid_request_error", "conflict"),
    (PolicyConflict, 409, "invalid_request_error", "policy_conflict"),
    (RequestTooLarge, 413, "invalid_request_error", "request_too_large"),
    (RateLimited, 429, "requests", "rate_limit_exceeded"),
    (EngineFailed, 500, "server_error", "engine_error"),
    (ServiceUnavailable, 503, "server_error", "service_unavailable"),
]


@pytest.mark.parametrize(("cls", "status", "kind", "code"), GATEWAY_ERRORS)
def test_gateway_errors_keep_their_status_type_and_code(
    cls: type[GatewayError], status: int, kind: str | None, code: str | None
) -> None:
    err = cls("message")
    assert (err.status_code, err.error_type, err.code) == (status, kind, code)
    assert err.envelope()["error"] == {
        "message": "message",
        "type": kind,
        "param": None,
        "code": code,
    }


def test_an_instance_may_name_its_own_code_type_and_status() -> None:
    err = RateLimited("slow down", error_type="tokens", code="x", status=418)
    assert (err.status_code, err.error_type, err.code) == (418, "tokens", "x")


def test_content_filtered_keeps_azures_body() -> None:
    body = {"error": {"message": "blocked", "code": "content_filter", "param": "prompt"}}
    err = ContentFiltered(body)
    assert err.status_code == 400 and err.code == "content_filter" and err.error_type is None
    assert err.envelope() is body


def test_every_model_error_class_is_in_the_table_or_under_a_listed_base() -> None:
    import model.errors as model_errors

    classes = [
        c for c in vars(model_errors).values() if isinstance(c, type) and issubclass(c, ModelError)
    ]
    assert len(classes) >= 10
    for cls in classes:
        assert any(base in ERRORS for base in cls.__mro__), cls


def test_a_request_that_never_fits_is_a_400_without_a_retry_hint() -> None:
    err = as_gateway_error(RequestNeverFits("it needs 900 tokens; a slot holds 256"))
    assert err.status_code == 400
    assert (err.code, err.error_type, err.param) == (
        "context_length_exceeded",
        "invalid_request_error",
        "messages",
    )
    assert "900 tokens" in err.message
    assert "retry-after" not in err.headers


def test_an_overloaded_engine_is_a_503_to_retry_shortly() -> None:
    err = as_gateway_error(EngineOverloaded("all 1 slots are busy"))
    assert (err.status_code, err.code, err.headers) == (
        503,
        "engine_overloaded",
        {"retry-after": "1"},
    )
    assert "retry shortly" in err.message


def test_input_rejected_is_the_clients_400() -> None:
    err = as_gateway_error(InputRejected("This model does not accept images."))
    assert (err.status_code, err.code, err.param) == (400, "invalid_model_input", "messages")
    assert err.message == "This model does not accept images."


@pytest.mark.parametrize(
    "exc",
    [
        EngineError("secret-detail /srv/model path"),
        ConnectionFailed("secret-detail 10.0.0.7:8000"),
        RuntimeError("secret-detail in a bug"),
    ],
)
def test_a_500_never_shows_the_exceptions_text(exc: BaseException) -> None:
    err = as_gateway_error(exc)
    assert (err.status_code, err.code) == (500, "engine_error")
    assert "secret-detail" not in json.dumps(err.envelope())


def test_with_headers_adds_the_admissions_headers_to_mapped_errors_only() -> None:
    admitted = {"x-policy": "default; version=1", "retry-after": "9"}
    err = with_headers(UpstreamUnavailable("down"), admitted)
    assert isinstance(err, GatewayError) and err.status_code == 503
    # The error's own retry hint wins over the admission's.
    assert err.headers == {"x-policy": "default; version=1", "retry-after": "1"}
    gone = ClientDisconnect()
    assert with_headers(gone, admitted) is gone


# -- the real fast engine, one slot, nothing may wait -----------------------------------------
@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> tuple[Any, Any]:
    processor = AutoProcessor.from_pretrained(demo_model_dir)
    model = MllamaForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    return model, processor


def response_of(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    response = exception_response(exc)
    return response.status_code, json.loads(bytes(response.body)), dict(response.headers)


def test_through_the_fast_engine_never_fits_is_400_and_busy_is_503(
    loaded: tuple[Any, Any],
) -> None:
    geometry = CacheGeometry.from_model(loaded[0], max_len=256, max_images=1, dtype=torch.float32)
    budget = geometry.bytes_per_slot + geometry.bytes_per_slot // 2  # the whole budget: one slot
    assert plan_slots(geometry, budget, max_slots=8) == 1
    eng = make_engine(
        loaded, max_len=256, max_images_per_request=1, memory_budget_bytes=budget, max_waiting=0
    )

    async def refusals() -> list[BaseException]:
        caught: list[BaseException] = []
        busy = stream_of(eng, request(TEXTS[0], rid="busy", max_tokens=150))
        await busy.__anext__()  # it holds the only slot now
        for req in (
            request(TEXTS[2], rid="fits-later", max_tokens=4),
            request(TEXTS[0], rid="too-long", max_tokens=250),
            request("two?", image(RED), image(BLUE), rid="too-many-images"),
        ):
            try:
                await run(eng, req)
            except Exception as exc:
                caught.append(exc)
        await busy.aclose()
        return caught

    try:
        later, too_long, too_many = asyncio.run(refusals())
    finally:
        asyncio.run(eng.stop())
    status, body, headers = response_of(later)
    assert status == 503 and body["error"]["code"] == "engine_overloaded"
    assert headers["retry-after"] == "1"
    for exc in (too_long, too_many):
        status, body, headers = response_of(exc)
        assert status == 400, body
        assert body["error"]["code"] == "context_length_exceeded"
        assert body["error"]["type"] == "invalid_request_error"
        assert "retry-after" not in headers
    assert "256" in response_of(too_long)[1]["error"]["message"]
