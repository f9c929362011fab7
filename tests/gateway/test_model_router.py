"""The routes file (schema, messages), ModelRouter resolution, and the upstream engine served
through today's app (create_app(engine=...)) end to end with the OpenAI SDK."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import openai
import pytest

from gateway.errors import GatewayError, as_gateway_error
from gateway.model_router import ModelRouter
from gateway.model_routes_file import (
    LiteLLMRoute,
    RoutesFileError,
    UpstreamRoute,
    load_routes_file,
    parse_routes,
)
from gateway.settings import Settings
from model.engine import Engine, EngineEvent, EngineInfo, EngineRequest, Finished
from model.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from model.litellm_engine import LiteLLMEngine
from model.upstream import OpenAIUpstreamEngine, UpstreamConfig
from tests.conftest import REDIS_URL, TEST_API_KEY, LiveServer, wait_until_ready
from tests.model.test_upstream import WORDS, MockServer

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
# Exactly what the Helm chart writes in split mode.
CHART_ROUTES = f"""routes:
- api_base: http://rel-llama-gateway-engine.ns.svc:8000/v1
  api_key_env: GATEWAY_BOOTSTRAP_KEY
  model: {MODEL}
"""


class FakeLocal(Engine):
    """Stands in for the transformers engine: records the settings it was built with."""

    built: ClassVar[list[Any]] = []

    def __init__(self, settings: Any) -> None:
        FakeLocal.built.append(settings)
        self.started = False
        self._info = EngineInfo(settings.model_id, 4096, 1, "cpu", "float32")

    @property
    def info(self) -> EngineInfo:
        return self._info

    def ready(self) -> bool:
        return self.started

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return 1

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        yield Finished("stop", 1, 0)


def errors_of(text: str) -> str:
    with pytest.raises(RoutesFileError) as caught:
        parse_routes(text, "routes.yaml")
    return str(caught.value)


# -- the schema -------------------------------------------------------------------------------
def test_the_charts_routes_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(CHART_ROUTES)
    (route,) = load_routes_file(path).routes
    assert isinstance(route, UpstreamRoute)
    assert route.model == MODEL and route.api_key_env == "GATEWAY_BOOTSTRAP_KEY"
    assert route.api_base == "http://rel-llama-gateway-engine.ns.svc:8000/v1"
    assert (route.retries, route.pool_size, route.timeouts.connect) == (2, 100, 5.0)


def test_a_full_file_parses() -> None:
    spec = parse_routes(
        """
routes:
  - model: llama-11b
    aliases: [meta-llama/Llama-3.2-11B-Vision-Instruct]
    api_base: https://vllm.internal/v1/
    api_key_file: /run/secrets/vllm/key
    upstream_model: meta-llama/Llama-3.2-11B-Vision-Instruct
    timeouts: {connect: 2, read: 30, total: 300}
    pool_size: 32
    retries: 1
    policy: strict
  - model: llama-90b
    litellm_model: bedrock/meta.llama3-2-90b-instruct-v1:0
    litellm_kwargs: {aws_region_name: us-west-2}
  - model: local
    engine: local
"""
    )
    upstream, litellm_route, local = spec.routes
    assert isinstance(upstream, UpstreamRoute) and upstream.api_base == "https://vllm.internal/v1"
    assert upstream.policy == "strict" and upstream.timeouts.read == 30
    assert isinstance(litellm_route, LiteLLMRoute)  # engine inferred from litellm_model
    assert litellm_route.litellm_kwargs == {"aws_region_name": "us-west-2"}
    assert local.engine == "local"


def test_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(CHART_ROUTES + "  api_kye: oops\n")
    with pytest.raises(RoutesFileError) as caught:
        load_routes_file(path)
    assert str(caught.value) == (
        f"{path}: line 5: routes[0].api_kye: unknown key (not part of the routes schema)"
    )


def test_missing_api_base() -> None:
    assert "line 2: routes[0].api_base: Field required" in errors_of(
        "routes:\n  - model: m\n    api_key_env: KEY\n"
    )


@pytest.mark.parametrize(
    ("aliases", "expected"),
    [
        ('[" spaced"]', "routes[0].aliases[0]: alias ' spaced' has leading or trailing spaces"),
        ('[""]', "routes[0].aliases[0]: alias must not be empty"),
        ("[M]", "routes[0].aliases[0]: 'M' is already served by routes[0]"),
        ("[other]", "routes[1].model: 'OTHER' is already served by routes[0]"),
        ("[7]", "routes[0].aliases[0]: Input should be a valid string"),
    ],
)
def test_bad_alias(aliases: str, expected: str) -> None:
    text = (
        f"routes:\n  - model: m\n    api_base: http://a/v1\n    aliases: {aliases}\n"
        "  - model: OTHER\n    api_base: http://b/v1\n"
    )
    assert expected in errors_of(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routes: []", "routes: List should have at least 1 item"),
        ("- a", "the file must be a mapping with a `routes:` list"),
        ("routes: [", "line 1: invalid YAML"),
        ("routes:\n  - {model: m, engine: gpu}", "routes[0].engine: engine must be one of"),
        ("routes:\n  - {model: m, api_base: 'ftp://x'}", "routes[0].api_base: must be an http"),
        (
            "routes:\n  - {model: m, api_base: 'http://x', api_key_env: A, api_key_file: /k}",
            "routes[0]: set api_key_env or api_key_file, not both",
        ),
        ("routes:\n  - {model: m, api_base: 'http://x', api_key_env: 'NOT-A-NAME'}", "api_key_env"),
        (
            "routes:\n  - {model: a, engine: local}\n  - {model: b, engine: local}",
            "line 3: routes[1].engine: at most one route can use engine: local",
        ),
        ("routes:\n  - {model: m, api_base: 'http://x', retries: -1}", "routes[0].retries"),
        ("routes:\n  - {model: m, engine: litellm}", "routes[0].litellm_model: Field required"),
    ],
)
def test_invalid_files(text: str, expected: str) -> None:
    assert expected in errors_of(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RoutesFileError, match="cannot read"):
        load_routes_file(tmp_path / "missing.yaml")


# -- the router -------------------------------------------------------------------------------
def test_no_routes_file_serves_the_local_engine_as_today(tmp_path: Path) -> None:
    FakeLocal.built.clear()
    settings = Settings(state_dir=tmp_path)
    router = ModelRouter.from_settings(settings, FakeLocal)
    assert FakeLocal.built == [settings]
    assert router.model_ids() == [MODEL]
    for name in (MODEL, MODEL.upper(), "meta-llama/Llama-3.2-11B-Vision-Instruct", f" {MODEL} "):
        route = router.resolve(name)
        assert route is not None and route.model == MODEL and route.kind == "local"
    assert router.resolve("gpt-4o") is None
    assert router.canonical_model_id("META-LLAMA/LLAMA-3.2-11B-VISION-INSTRUCT") == MODEL


def test_routes_file_without_local_route_builds_no_local_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_BOOTSTRAP_KEY", "sk-engine-key-0123456789")
    (tmp_path / "routes.yaml").write_text(CHART_ROUTES)
    settings = Settings(state_dir=tmp_path)
    FakeLocal.built.clear()
    router = ModelRouter.from_settings(_with_routes(settings, tmp_path / "routes.yaml"), FakeLocal)
    assert FakeLocal.built == []
    (route,) = router.routes
    assert isinstance(route.engine, OpenAIUpstreamEngine) and route.kind == "upstream"
    assert route.engine.config.api_key == "sk-engine-key-0123456789"
    assert route.engine.info.model_id == MODEL


def _with_routes(settings: Settings, path: Path) -> Settings:
    return settings.model_copy(update={"routes_file": path})


async def test_mixed_routes_resolve_aliases_and_manage_engines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    spec = parse_routes(
        f"""
routes:
  - model: remote
    aliases: [Remote-Alias]
    api_base: http://127.0.0.1:9/v1
    api_key_file: {secret}
    policy: strict
  - model: provider
    litellm_model: openai/x
  - model: Local-Llama
    aliases: [ll]
    engine: local
"""
    )
    FakeLocal.built.clear()
    router = ModelRouter.from_spec(spec, Settings(state_dir=tmp_path), FakeLocal)
    assert router.model_ids() == ["remote", "provider", "Local-Llama"]
    remote = router.resolve("remote-ALIAS")
    assert remote is not None and remote.model == "remote" and remote.policy == "strict"
    assert isinstance(remote.engine, OpenAIUpstreamEngine)
    assert remote.engine.config.api_key == "sk-from-file"
    provider = router.resolve("PROVIDER")
    assert provider is not None and isinstance(provider.engine, LiteLLMEngine)
    local = router.resolve("LL")
    assert local is not None and local.kind == "local"
    # The local engine is built with the route's name as its model id.
    assert [s.model_id for s in FakeLocal.built] == ["Local-Llama"]
    assert len(router.engines) == 3
    assert router.not_ready() == ["remote", "provider", "Local-Llama"]
    await router.resolve("remote").engine.start()  # type: ignore[union-attr]
    await local.engine.start()
    assert router.not_ready() == ["provider"]
    await router.stop()
    assert not local.engine.ready()


def test_missing_key_env_fails_at_start_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_BOOTSTRAP_KEY", raising=False)
    with pytest.raises(RoutesFileError) as caught:
        ModelRouter.from_spec(parse_routes(CHART_ROUTES), Settings(state_dir=tmp_path), FakeLocal)
    assert "routes[0].api_key_env: environment variable GATEWAY_BOOTSTRAP_KEY is not set" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (UpstreamBadResponse("bad"), 502, "upstream_bad_response"),
        (UpstreamUnavailable("down"), 503, "upstream_unavailable"),
        (UpstreamTimeout("slow"), 504, "upstream_timeout"),
    ],
)
def test_upstream_errors_become_envelopes(exc: Any, status: int, code: str) -> None:
    err = as_gateway_error(exc)
    assert isinstance(err, GatewayError) and err.status_code == status
    assert err.envelope() == {
        "error": {"message": exc.message, "type": "server_error", "param": None, "code": code}
    }


# -- through today's app ------------------------------------------------------------------------
def app_over(mock: MockServer, state_dir: Path) -> Any:
    """Today's app serving `served-model` from the mock upstream."""
    from gateway.app import create_app

    engine = OpenAIUpstreamEngine(
        UpstreamConfig(model_id="served-model", api_base=mock.base_url, upstream_model="ok")
    )
    settings = Settings(
        model_id="served-model",
        model_aliases=[],
        state_dir=state_dir,
        redis_url=REDIS_URL,
        redis_key_prefix=f"gwtest-routes-{secrets.token_hex(4)}",
        bootstrap_key=TEST_API_KEY,
    )
    return create_app(settings, engine=engine)


@pytest.fixture(scope="module")
def gateway_over_mock(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with (
        MockServer() as mock,
        LiveServer(app_over(mock, tmp_path_factory.mktemp("state"))) as server,
    ):
        wait_until_ready(server.base_url)
        yield server


def test_openai_sdk_through_the_gateway_streams_upstream_deltas(gateway_over_mock: Any) -> None:
    client = openai.OpenAI(
        base_url=gateway_over_mock.base_url + "/v1", api_key=TEST_API_KEY, max_retries=0
    )
    stream = client.chat.completions.create(
        model="served-model",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(WORDS)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 11
    resp = client.chat.completions.create(
        model="served-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert resp.choices[0].message.content == "".join(WORDS)
    # Non-streaming: fetched as one JSON answer upstream, whose usage says 5 + 2.
    assert resp.usage is not None and resp.usage.completion_tokens == 2


async def test_the_engines_generator_is_closed_by_the_request_not_the_gc(
    tmp_path: Path,
) -> None:
    """A non-streaming completion closes the engine's event generator itself. Left to the
    garbage collector, every request cost the loop's async-generator finalizer: a thread-safe
    wake-up and a task of its own to close it later."""
    import sys

    import httpx

    finalized: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def finalizer(agen: Any) -> None:
        finalized.append(agen.__qualname__)
        assert hooks.finalizer is not None
        hooks.finalizer(agen)

    with MockServer() as mock:
        app = app_over(mock, tmp_path)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
                try:
                    for _ in range(3):
                        resp = await client.post(
                            "/v1/chat/completions",
                            json={
                                "model": "served-model",
                                "messages": [{"role": "user", "content": "Hi"}],
                            },
                            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                        )
                        assert resp.status_code == 200, resp.text
                        assert resp.json()["choices"][0]["message"]["content"] == "".join(WORDS)
                finally:
                    sys.set_asyncgen_hooks(*hooks)
    assert not [name for name in finalized if "generate" in name], finalized
