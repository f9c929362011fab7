"""End to end: the official OpenAI SDK (and litellm) against a live gateway on loopback."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from gateway.services import services_of
from tests.conftest import AUTH, TEST_API_KEY

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
# The default policy without Llama Guard weights: nobody judges the harm categories (the seed's
# `{"filtered": false}`, no claimed severity); jailbreak is judged on the prompt only.
SAFE_RESULTS = {
    "hate": {"filtered": False},
    "self_harm": {"filtered": False},
    "sexual": {"filtered": False},
    "violence": {"filtered": False},
    "jailbreak": {"filtered": False, "detected": False},
    "profanity": {"filtered": False, "detected": False},
}


def assert_safe(results: dict[str, Any], stage: str = "output") -> None:
    """The contract's keys with safe values; any extra key (blocklists...) is not filtered."""
    expected = dict(SAFE_RESULTS)
    if stage == "output":
        expected["jailbreak"] = {"filtered": False}
    assert {k: results[k] for k in expected} == expected
    assert all(v.get("filtered") is False for v in results.values())


def png_data_url(color: tuple[int, int, int] = (200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def client(live_gateway) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(
        base_url=live_gateway.base_url + "/v1", api_key=TEST_API_KEY, max_retries=0
    )


def test_non_streaming_text(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert re.fullmatch(r"chat-[0-9a-f]{32}", resp.id)
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert resp.system_fingerprint
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    raw = resp.model_dump()
    assert_safe(raw["choices"][0]["content_filter_results"])
    [prompt_results] = raw["prompt_filter_results"]
    assert prompt_results["prompt_index"] == 0
    assert_safe(prompt_results["content_filter_results"], "input")


def test_alias_model_name_answers_with_canonical_id(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="meta-llama/Llama-3.2-11B-Vision-Instruct",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
    )
    assert resp.model == MODEL


def test_image_request_usage_counts_real_tokens(client: openai.OpenAI, gateway_settings) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoProcessor

    with_image = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url()}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
        max_tokens=4,
        temperature=0,
    )
    assert with_image.choices[0].finish_reason in ("stop", "length")
    processor = AutoProcessor.from_pretrained(gateway_settings.model_path)
    prompt = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}],
            }
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") in ids
    assert with_image.usage is not None
    # The image counts as its vision tokens (2 tiles of 17 in the demo model) instead of its
    # one <|image|> placeholder (the contract since issue 14).
    details = with_image.usage.prompt_tokens_details
    assert details is not None and details.image_tokens == 2 * 17 and details.cached_tokens == 0
    assert with_image.usage.prompt_tokens == len(ids) - 1 + details.image_tokens


def test_n_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a word"}],
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=3,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage is not None
    assert resp.usage.completion_tokens <= 12
    for c in resp.choices:
        assert_safe(c.model_dump()["content_filter_results"])


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me something"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    first = with_choices[0].model_dump()
    assert_safe(first["prompt_filter_results"][0]["content_filter_results"], "input")
    assert len({c.id for c in chunks}) == 1
    for chunk in with_choices:
        assert_safe(chunk.model_dump()["choices"][0]["content_filter_results"])
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    # Exactly one chunk without choices: the last, carrying usage.
    assert [c for c in chunks if not c.choices] == [chunks[-1]]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 10
    # The streamed text equals the non-streaming greedy answer.
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    same = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me something"}],
        max_tokens=10,
        temperature=0,
    )
    assert text == same.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == same.usage.completion_tokens  # type: ignore[union-attr]


def test_streaming_without_usage_has_no_empty_choices(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=5,
        stream=True,
        n=2,
    )
    chunks = list(stream)
    assert all(c.choices for c in chunks)
    finishes = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason
    }
    assert set(finishes) == {0, 1}


def test_streaming_raw_sse_ends_with_done(live_gateway) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    with httpx.stream(
        "POST", live_gateway.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_litellm_as_client(live_gateway) -> None:  # type: ignore[no-untyped-def]
    import litellm

    resp = litellm.completion(
        model="openai/" + MODEL,
        api_base=live_gateway.base_url + "/v1",
        api_key=TEST_API_KEY,
        messages=[{"role": "user", "content": "Hello from litellm"}],
        max_tokens=4,
    )
    assert resp.choices[0].finish_reason in ("stop", "length")  # type: ignore[union-attr]
    assert resp.usage.completion_tokens <= 4  # type: ignore[attr-defined]


def test_models_endpoints(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_ready_metrics(live_gateway) -> None:  # type: ignore[no-untyped-def]
    base = live_gateway.base_url
    assert httpx.get(base + "/healthz").status_code == 200
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["engine"] is True
    metrics = httpx.get(base + "/metrics")
    assert metrics.status_code == 200
    assert "gateway_requests_total" in metrics.text
    assert "gateway_time_to_first_token_seconds" in metrics.text


def test_request_id_is_echoed(live_gateway) -> None:  # type: ignore[no-untyped-def]
    resp = httpx.get(live_gateway.base_url + "/healthz", headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    fresh = httpx.get(live_gateway.base_url + "/healthz")
    assert fresh.headers["x-request-id"].startswith("req_")


def test_client_disconnect_frees_the_engine(live_gateway) -> None:  # type: ignore[no-untyped-def]
    import time

    engine = services_of(live_gateway.server.config.app).router.routes[0].engine
    body = {
        "model": MODEL,
        # Greedy on this prompt runs to max_tokens on the demo model.
        "messages": [{"role": "user", "content": "Long answer please"}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", live_gateway.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as resp:
        lines = resp.iter_lines()  # keep it referenced: a collected iterator closes the socket
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        assert engine.scheduler.active_count == 1
    # The client has gone: the request leaves the batch at the next step.
    deadline = time.monotonic() + 10
    while engine.scheduler.active_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.active_count == 0


def test_event_loop_answers_while_the_model_works(live_gateway) -> None:  # type: ignore[no-untyped-def]
    import threading

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Long answer please"}],
        "max_tokens": 400,
        "temperature": 0,
    }
    worker = threading.Thread(
        target=lambda: httpx.post(
            live_gateway.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120
        )
    )
    worker.start()
    engine = services_of(live_gateway.server.config.app).router.routes[0].engine
    while engine.scheduler.active_count == 0 and worker.is_alive():
        pass
    # Model work runs in the scheduler's thread: health checks are answered meanwhile.
    assert engine.scheduler.active_count == 1
    assert httpx.get(live_gateway.base_url + "/healthz", timeout=5).status_code == 200
    assert engine.scheduler.active_count == 1  # still generating when the answer came
    worker.join()


def test_a_non_streaming_client_that_gives_up_frees_the_engine(live_gateway) -> None:  # type: ignore[no-untyped-def]
    import time

    engine = services_of(live_gateway.server.config.app).router.routes[0].engine
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Long answer please"}],  # greedy: to max_tokens
        "max_tokens": 1900,  # about 3 s of generation on the demo model here
        "temperature": 0,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            live_gateway.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5
        )
    deadline = time.monotonic() + 1.0
    while engine.scheduler.active_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.active_count == 0  # cancelled, not generating 1500 tokens for nobody
