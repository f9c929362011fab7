"""`/v1/moderations` and chat with a Llama Guard 3 11B-Vision-style guard whose weights are set so
that it always answers `unsafe` / `S10` (hate): scores from the model, the image judged, the
harm categories reported with a severity now that a guard judges them, inputs batched."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from transformers import AutoProcessor, MllamaForConditionalGeneration

from gateway.services import services_of
from guards.omni_categories import OMNI_CATEGORIES
from testkit.tiny_guard_models import (
    build_tiny_llama_guard_vision,
    llama_guard_chain_ids,
    rig_llama_guard_chain,
)
from tests.conftest import TEST_ADMIN_TOKEN, TEST_API_KEY, LiveServer, wait_until_ready
from tests.gateway.conftest import copy_project_policies

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
HARM = ("hate", "self_harm", "sexual", "violence")


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 200, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def forced_hate_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny vision Llama Guard whose weights make it answer `unsafe\\nS10`, saved by path."""
    path = build_tiny_llama_guard_vision(tmp_path_factory.mktemp("lg") / "vision")
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    model = MllamaForConditionalGeneration.from_pretrained(path)
    rig_llama_guard_chain(model, llama_guard_chain_ids(tokenizer, "unsafe\nS10"))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def app_and_server(
    gateway_settings: Any, forced_hate_guard: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, LiveServer]]:
    from gateway.app import create_app

    policies = copy_project_policies(tmp_path_factory.mktemp("policies"))
    settings = gateway_settings.model_copy(
        update={
            "policy_dir": policies,
            "state_dir": tmp_path_factory.mktemp("state"),
            "llama_guard_path": forced_hate_guard,
        }
    )
    app = create_app(settings)
    with LiveServer(app) as live:
        wait_until_ready(live.base_url)
        yield app, live


@pytest.fixture(scope="module")
def server(app_and_server: tuple[Any, LiveServer]) -> LiveServer:
    return app_and_server[1]


def sdk(server: LiveServer, key: str = TEST_API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def dump(response: Any) -> list[dict[str, Any]]:
    return [r.model_dump(by_alias=True) for r in response.results]


def test_forced_unsafe_flags_hate_near_one_and_the_rest_near_zero(server: LiveServer) -> None:
    (result,) = dump(sdk(server).moderations.create(input="some text"))
    assert result["flagged"] is True and result["blocked"] is True
    assert result["categories"]["hate"] is True
    scores = result["category_scores"]
    assert scores["hate"] > 0.99
    assert all(0.0 <= scores[c] < 0.01 for c in OMNI_CATEGORIES if c != "hate"), scores
    assert [c for c in OMNI_CATEGORIES if result["categories"][c]] == ["hate"]
    applied = result["category_applied_input_types"]
    assert applied["hate"] == ["text"] and applied["violence"] == ["text"]  # judged, on text
    assert applied["harassment"] == [] and applied["violence/graphic"] == []  # no judge
    # Codes without an omni counterpart are reported as ours, with the model's probability.
    assert set(result["gateway_categories"]) >= {"S5", "S13"}
    assert result["gateway_categories"]["S5"]["score"] < 0.01
    hate = result["content_filter_results"]["hate"]
    assert hate == {"filtered": True, "severity": "high"}


def test_the_image_is_judged_by_the_vision_guard(server: LiveServer) -> None:
    (result,) = dump(
        sdk(server).moderations.create(
            input=[
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": png_data_url()}},
            ]
        )
    )
    assert result["category_applied_input_types"]["hate"] == ["image", "text"]
    assert result["category_applied_input_types"]["harassment"] == []
    assert result["category_scores"]["hate"] > 0.99


def test_inputs_of_one_request_are_batched_and_concurrent_clients_agree(
    app_and_server: tuple[Any, LiveServer],
) -> None:
    app, server = app_and_server
    guard = services_of(app).guards.guards["llama_guard"]
    before = guard.batcher.calls
    results = dump(sdk(server).moderations.create(input=["a", "b", "c"]))
    assert guard.batcher.calls == before + 1  # three inputs, one batched call
    assert [r["categories"]["hate"] for r in results] == [True, True, True]

    def one(i: int) -> list[float]:
        response = sdk(server).moderations.create(input=[f"text {i}", f"more {i}"])
        return [r["category_scores"]["hate"] for r in dump(response)]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(16)))
    assert all(len(o) == 2 and all(s > 0.99 for s in o) for o in outcomes)


def test_chat_reports_severity_for_the_categories_llama_guard_judged(server: LiveServer) -> None:
    key = httpx.post(
        server.base_url + "/admin/keys", json={"name": "a", "policy": "audit"}, headers=ADMIN
    ).json()["key"]
    raw = (
        sdk(server, key)
        .chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        .model_dump()
    )
    prompt = raw["prompt_filter_results"][0]["content_filter_results"]
    assert prompt["hate"] == {"filtered": False, "severity": "high"}  # audit: annotated
    assert all("severity" in prompt[k] for k in HARM)
    choice = raw["choices"][0]["content_filter_results"]
    assert all("severity" in choice[k] for k in HARM)
    with pytest.raises(openai.BadRequestError) as err:  # the default policy blocks it
        sdk(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    inner = err.value.body["innererror"]["content_filter_result"]  # type: ignore[index]
    assert inner["hate"] == {"filtered": True, "severity": "high"}
    assert inner["violence"] == {"filtered": False, "severity": "safe"}
