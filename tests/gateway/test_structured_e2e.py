"""response_format and logprobs end to end: the OpenAI SDK against a live gateway on the demo
model (random weights: every valid object is the grammar's doing)."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import TEST_API_KEY

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
INVOICE = {
    "type": "object",
    "properties": {
        "number": {"type": "string", "maxLength": 6},
        "total": {"type": "integer", "minimum": 0, "maximum": 99},
        "paid": {"type": "boolean"},
    },
    "required": ["number", "total", "paid"],
    "additionalProperties": False,
}


class Invoice(BaseModel):
    number: str = Field(max_length=6)
    total: int = Field(ge=0, le=99)
    currency: Literal["EUR", "USD"]
    paid: bool


@pytest.fixture()
def client(live_gateway) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(
        base_url=live_gateway.base_url + "/v1", api_key=TEST_API_KEY, max_retries=0
    )


def ask(client: openai.OpenAI, seed: int, **kw: Any) -> Any:
    params: dict[str, Any] = {"max_tokens": 48, "temperature": 1.0, "seed": seed, **kw}
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Read the invoice; answer in JSON."}],
        **params,
    )


def test_json_schema_outputs_validate(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE}}
    stopped = 0
    for seed in range(8):
        choice = ask(client, seed, response_format=fmt).choices[0]
        if choice.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(choice.message.content), INVOICE)
        else:
            assert choice.finish_reason == "length"
    assert stopped >= 3


def test_json_object_mode_gives_objects(client: openai.OpenAI) -> None:
    for seed in range(6):
        choice = ask(client, seed, response_format={"type": "json_object"}).choices[0]
        text = choice.message.content
        assert text.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    parsed = []
    for seed in range(8):
        try:
            completion = client.chat.completions.parse(
                model=MODEL,
                messages=[{"role": "user", "content": "Read the invoice."}],
                response_format=Invoice,
                max_tokens=60,
                temperature=1.0,
                seed=seed,
            )
        except openai.LengthFinishReasonError:
            continue
        message = completion.choices[0].message
        assert isinstance(message.parsed, Invoice)
        assert message.parsed == Invoice.model_validate_json(message.content or "")
        parsed.append(message.parsed)
    assert len(parsed) >= 2


def test_unsupported_schema_feature_is_named(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}
    with pytest.raises(openai.BadRequestError) as err:
        ask(
            client,
            0,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert err.value.code == "invalid_json_schema"
    assert "'format' at #/properties/d" in err.value.message


def test_logprobs_non_streaming(client: openai.OpenAI) -> None:
    resp = ask(client, 1, logprobs=True, top_logprobs=3, max_tokens=10)
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert content and len(content) <= resp.usage.completion_tokens
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == (
        choice.message.content
    )
    for token in content:
        assert token.logprob <= 0.0
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted(
            (t.logprob for t in token.top_logprobs), reverse=True
        )
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1.0 + 1e-5


def test_logprobs_streaming_match_the_text(client: openai.OpenAI) -> None:
    stream = ask(client, 2, logprobs=True, top_logprobs=2, max_tokens=12, stream=True)
    text, tokens = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                tokens += choice.logprobs.content
    assert tokens
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace") == text
    assert all(len(t.top_logprobs) == 2 for t in tokens)


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    assert ask(client, 3, max_tokens=4).choices[0].logprobs is None
