"""The upstream engines against a real mock OpenAI server on loopback (uvicorn in a thread).

The mock's behaviour is chosen by the `model` field that the engine sends upstream; requests are
recorded per `x-request-id` (the engine sends the engine request id), so each test counts its
own requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from model.engine import (
    ChatTurn,
    EngineEvent,
    EngineRequest,
    Finished,
    ImagePart,
    SamplingParams,
    TextDelta,
    TextPart,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from model.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from model.openai_wire import SSEParser, estimate_prompt_tokens
from model.upstream import OpenAIUpstreamEngine, UpstreamConfig, coalesce_deltas

WORDS = ["Hel", "lo", " world"]
Send = Any


class MockUpstream:
    """A raw ASGI OpenAI-ish `/v1/chat/completions`; `model` picks the behaviour."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.headers: dict[str, dict[str, str]] = {}
        self.disconnected: set[str] = set()
        self.client_ports: dict[str, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        body = json.loads(raw)
        self.bodies[rid].append(body)
        self.headers[rid] = headers
        self.client_ports[rid] = scope["client"][1]
        await self.behave(body["model"].split("/")[-1], rid, body, receive, send)

    async def behave(self, mode: str, rid: str, body: dict[str, Any], receive: Any, send: Send):  # type: ignore[no-untyped-def]
        tries = len(self.bodies[rid])
        if mode == "fail500" or (mode == "flaky" and tries == 1) or mode == "always503":
            status = 500 if mode == "fail500" else 503
            return await _json(send, status, {"error": {"message": "engine exploded"}})
        if mode == "hang":  # until the client gives up (at most 3 s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await receive()
            return await _json(send, 200, {})
        if mode == "json":
            return await _json(send, 200, _completion("whole answer"))
        if mode == "toolcalls":
            return await tool_call_answer(body, send)
        if mode == "late":  # silent for 0.4 s before it answers
            await asyncio.sleep(0.4)
        if not body["stream"] and mode in ("ok", "nousage", "late"):
            answer = _completion("".join(WORDS), finish="stop")
            if mode == "nousage":
                del answer["usage"]
            return await _json(send, 200, answer)
        await send_sse_start(send)
        if mode == "garbage":
            return await _send(send, b"data: {not json\n\n", more=False)
        finish = "content_filter" if mode == "filtered" else "stop"
        if mode == "drop_after_first":
            await _send(send, _chunk({"role": "assistant", "content": WORDS[0]}))
            raise RuntimeError("connection dropped by the mock")
        if mode == "slow":
            return await self.slow(rid, receive, send)
        if mode == "burst":  # every event in one write: the gateway reads them together
            return await _send(send, burst_events(), more=False)
        await _send(send, b": keep-alive comment\r\n\r\n")
        for word in WORDS:
            await _send(send, _chunk({"content": word}))
        await _send(send, _chunk({}, finish))
        if mode != "nousage":
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            await _send(send, _sse({"choices": [], "usage": usage}))
        await _send(send, b"data: [DONE]\n\n", more=False)

    async def slow(self, rid: str, receive: Any, send: Send) -> None:
        async def watch() -> None:
            if (await receive())["type"] == "http.disconnect":
                self.disconnected.add(rid)

        watcher = asyncio.create_task(watch())
        for _ in range(100):
            if watcher.done():
                return
            await _send(send, _chunk({"content": "x"}))
            await asyncio.sleep(0.02)
        watcher.cancel()
        await _send(send, b"data: [DONE]\n\n", more=False)


LOGPROBS = {
    "content": [
        {
            "token": "Hi",
            "logprob": -0.5,
            "bytes": [72, 105],
            "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}],
        }
    ]
}
UPSTREAM_CALLS = [
    {"id": "u1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
    {"id": "u2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
]


def _logprob(token: str) -> dict[str, Any]:
    data = list(token.encode())
    return {"token": token, "logprob": -0.25, "bytes": data, "top_logprobs": []}


def burst_events() -> bytes:
    """Two words with logprobs, a tool call, a last word, the finish and usage, in one write."""
    words = [
        _sse(
            {
                "choices": [
                    {"index": 0, "delta": {"content": w}, "logprobs": {"content": [_logprob(w)]}}
                ]
            }
        )
        for w in ("Hel", "lo")
    ]
    call = {
        "index": 0,
        "id": "u1",
        "type": "function",
        "function": {"name": "a", "arguments": "{}"},
    }
    return b"".join(
        [
            *words,
            _chunk({"tool_calls": [call]}, "tool_calls"),
            _sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}}),
            b"data: [DONE]\n\n",
        ]
    )


async def tool_call_answer(body: dict[str, Any], send: Send) -> None:
    """Text with logprobs, then two tool calls (streamed in pieces, as OpenAI does)."""
    if not body["stream"]:
        message = {"role": "assistant", "content": None, "tool_calls": UPSTREAM_CALLS}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}
        return await _json(send, 200, {"choices": [choice]})
    await send_sse_start(send)
    choice = {"index": 0, "delta": {"content": "Hi"}, "logprobs": LOGPROBS, "finish_reason": None}
    await _send(send, _sse({"choices": [choice]}))
    for i, call in enumerate(UPSTREAM_CALLS):
        head = {"index": i, "id": call["id"], "type": "function"}
        head["function"] = {"name": call["function"]["name"], "arguments": ""}
        await _send(send, _chunk({"tool_calls": [head]}))
        arguments = call["function"]["arguments"]
        for piece in (arguments[:2], arguments[2:]):
            await _send(
                send, _chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
            )
    await _send(send, _chunk({}, "tool_calls"))
    await _send(send, b"data: [DONE]\n\n", more=False)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _sse({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})


def _completion(text: str, finish: str = "length") -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    return {
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


async def send_sse_start(send: Send) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def _send(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _json(send: Send, status: int, obj: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await _send(send, json.dumps(obj).encode(), more=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MockServer:
    """uvicorn in a thread, short graceful shutdown (the `hang` handler must not hold it)."""

    def __init__(self) -> None:
        import uvicorn

        self.app = MockUpstream()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> MockServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "mock did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def mock() -> Any:
    with MockServer() as server:
        yield server


_ids = iter(range(1_000_000))


def request(*parts: TextPart | ImagePart, stream: bool = True, **sampling: Any) -> EngineRequest:
    params = SamplingParams(max_tokens=sampling.pop("max_tokens", 16), **sampling)
    turns = (ChatTurn("system", (TextPart("Be brief."),)), ChatTurn("user", parts))
    return EngineRequest(f"req-{next(_ids)}", turns, params, stream=stream)


def engine_for(mock: MockServer, mode: str, **config: Any) -> OpenAIUpstreamEngine:
    defaults: dict[str, Any] = {"retry_backoff_s": 0.005, "api_key": "sk-upstream"}
    return OpenAIUpstreamEngine(
        UpstreamConfig(
            model_id="served", api_base=mock.base_url, upstream_model=mode, **defaults | config
        )
    )


async def collect(engine: Any, req: EngineRequest) -> list[EngineEvent]:
    await engine.start()
    try:
        return [event async for event in engine.generate(req)]
    finally:
        await engine.stop()


def texts(events: list[EngineEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, TextDelta)]


def answer(events: list[EngineEvent]) -> str:
    """The streamed text: deltas that arrive in one read are merged (`coalesce_deltas`), so
    how the words split into events depends on timing; their text and order do not."""
    return "".join(texts(events))


async def test_streams_deltas_in_order_with_upstream_usage(mock: MockServer) -> None:
    req = request(TextPart("Hi"), temperature=0.5, top_p=0.9, seed=7, stop=("END",))
    events = await collect(engine_for(mock, "ok"), req)
    assert answer(events) == "".join(WORDS)
    assert events[-1] == Finished("stop", 11, 3)
    (body,) = mock.app.bodies[req.request_id]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "ok"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert body | {"messages": None} == {
        "model": "ok",
        "messages": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 16,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["END"],
    }
    assert mock.app.headers[req.request_id]["authorization"] == "Bearer sk-upstream"


async def test_events_that_arrive_in_one_read_are_merged(mock: MockServer) -> None:
    """Adjacent text deltas of one read become one (logprobs in order); a tool-call delta is
    never merged into text; the usage still counts what the upstream said."""
    events = await collect(engine_for(mock, "burst"), request(TextPart("Hi")))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert (deltas[0].text, deltas[0].tool_calls) == ("Hello", False)
    assert [lp.token for lp in deltas[0].logprobs] == ["Hel", "lo"]
    assert deltas[0].tokens == 2  # what a client that leaves now is charged
    assert len(deltas) == 2 and deltas[1].tool_calls and '"name": "a"' in deltas[1].text
    assert events[-1] == Finished("stop", 11, 4)  # the gateway says tool_calls


def test_coalesce_deltas_keeps_order_and_kinds() -> None:
    a, b = TextDelta("a"), TextDelta("b", (TokenLogprob("b", -1.0, (98,)),))
    call, done = TextDelta("[call]", tool_calls=True), Finished("stop", 1, 3)
    assert coalesce_deltas([a]) == [a]
    assert coalesce_deltas([a, b, call, a, done]) == [
        TextDelta("ab", b.logprobs, tokens=2),
        call,
        a,
        done,
    ]


async def test_the_pooled_connection_is_reused(mock: MockServer) -> None:
    """The body is read to its end after [DONE], so the connection goes back to the pool."""
    engine = engine_for(mock, "ok")
    await engine.start()
    try:
        first, second = request(TextPart("Hi")), request(TextPart("Hi"))
        for req in (first, second):
            assert [e async for e in engine.generate(req)][-1] == Finished("stop", 11, 3)
        ports = mock.app.client_ports
        assert ports[first.request_id] == ports[second.request_id]
    finally:
        await engine.stop()


async def test_penalties_are_sent_when_set(mock: MockServer) -> None:
    req = request(TextPart("Hi"), presence_penalty=0.5, frequency_penalty=-0.25)
    await collect(engine_for(mock, "ok"), req)
    body = mock.app.bodies[req.request_id][0]
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -0.25)


async def test_deltas_are_yielded_as_they_arrive(mock: MockServer) -> None:
    """No re-buffering: the first delta is in hand while the upstream is still streaming."""
    engine = engine_for(mock, "slow")
    await engine.start()
    req = request(TextPart("Hi"))
    events = engine.generate(req)
    started = time.perf_counter()
    first = await anext(events)
    assert first == TextDelta("x")
    assert time.perf_counter() - started < 1.0  # the whole stream would take 2 s
    await events.aclose()  # type: ignore[attr-defined]
    # Closing the iterator cancels: the upstream sees the client go.
    deadline = time.monotonic() + 3
    while req.request_id not in mock.app.disconnected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert req.request_id in mock.app.disconnected
    await engine.stop()


async def test_upstream_500_is_unavailable_503(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    with pytest.raises(UpstreamUnavailable) as caught:
        await collect(engine_for(mock, "fail500", retries=0), req)
    assert type(caught.value) is UpstreamUnavailable  # 503 by gateway.errors.ERRORS
    assert "engine exploded" in caught.value.message


async def test_hanging_upstream_is_a_timeout_504(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    started = time.perf_counter()
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(engine_for(mock, "hang", read_timeout_s=0.2, retries=2), req)
    assert type(caught.value) is UpstreamTimeout  # 504 by gateway.errors.ERRORS
    assert time.perf_counter() - started < 1.5
    assert len(mock.app.bodies[req.request_id]) == 1  # a read timeout is not retried


async def test_total_timeout_bounds_the_call(mock: MockServer) -> None:
    with pytest.raises(UpstreamTimeout, match="total"):
        await collect(engine_for(mock, "hang", total_timeout_s=0.2), request(TextPart("Hi")))


async def test_connection_refused_is_unavailable_503() -> None:
    port = free_port()
    engine = OpenAIUpstreamEngine(
        UpstreamConfig(
            model_id="m", api_base=f"http://127.0.0.1:{port}/v1", retries=1, retry_backoff_s=0.001
        )
    )
    with pytest.raises(UpstreamUnavailable, match="Cannot reach") as caught:
        await collect(engine, request(TextPart("Hi")))
    assert type(caught.value) is UpstreamUnavailable  # 503 by gateway.errors.ERRORS


async def test_garbage_json_is_bad_response_502(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    with pytest.raises(UpstreamBadResponse, match="not JSON") as caught:
        await collect(engine_for(mock, "garbage"), req)
    assert type(caught.value) is UpstreamBadResponse  # 502 by gateway.errors.ERRORS
    assert len(mock.app.bodies[req.request_id]) == 1  # a bad answer is not retried


async def test_retries_a_503_before_the_first_token(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    events = await collect(engine_for(mock, "flaky", retries=2), req)
    assert answer(events) == "".join(WORDS) and events[-1] == Finished("stop", 11, 3)
    assert len(mock.app.bodies[req.request_id]) == 2


async def test_gives_up_after_the_configured_retries(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    with pytest.raises(UpstreamUnavailable):
        await collect(engine_for(mock, "always503", retries=2), req)
    assert len(mock.app.bodies[req.request_id]) == 3


async def test_never_retries_after_the_first_token(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    events = await collect(engine_for(mock, "drop_after_first", retries=3), req)
    assert texts(events) == [WORDS[0]]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "error"
    assert finished.error and "connection failed" in finished.error
    assert finished.completion_tokens == 1
    assert len(mock.app.bodies[req.request_id]) == 1


async def test_missing_usage_is_counted(mock: MockServer) -> None:
    req = request(TextPart("Hello there, how are you?"))  # 25 + 9 characters
    events = await collect(engine_for(mock, "nousage"), req)
    assert answer(events) == "".join(WORDS)
    assert events[-1] == Finished("stop", estimate_prompt_tokens(req.messages), 3)
    assert estimate_prompt_tokens(req.messages) == 9  # ceil(34 / 4)


async def test_content_filter_finish_reason_is_kept(mock: MockServer) -> None:
    events = await collect(engine_for(mock, "filtered"), request(TextPart("Hi")))
    assert isinstance(events[-1], Finished) and events[-1].reason == "content_filter"


async def test_a_non_streaming_request_fetches_one_json_answer(mock: MockServer) -> None:
    req = request(TextPart("Hi"), stream=False, temperature=0.0)
    events = await collect(engine_for(mock, "ok"), req)
    assert events == [TextDelta("".join(WORDS)), Finished("stop", 5, 2)]
    (body,) = mock.app.bodies[req.request_id]
    assert body["stream"] is False and "stream_options" not in body
    assert (body["max_tokens"], body["temperature"]) == (16, 0.0)


async def test_a_non_streamed_answer_without_usage_is_counted(mock: MockServer) -> None:
    req = request(TextPart("Hello there, how are you?"), stream=False)
    events = await collect(engine_for(mock, "nousage"), req)
    # The prompt as for streams; the completion by the same estimate: ceil(11 chars / 4).
    assert events[-1] == Finished("stop", estimate_prompt_tokens(req.messages), 3)


async def test_the_read_timeout_bounds_streams_not_whole_answers(mock: MockServer) -> None:
    """A non-streamed answer is silent until it is whole: only the total timeout applies."""
    engine = engine_for(mock, "late", read_timeout_s=0.2, retries=0)
    events = await collect(engine, request(TextPart("Hi"), stream=False))
    assert texts(events) == ["".join(WORDS)]
    with pytest.raises(UpstreamTimeout, match="read timeout"):
        await collect(engine, request(TextPart("Hi")))
    with pytest.raises(UpstreamTimeout, match="total"):
        late = engine_for(mock, "late", total_timeout_s=0.2, retries=0)
        await collect(late, request(TextPart("Hi"), stream=False))


async def test_an_upstream_that_streams_anyway_still_works(mock: MockServer) -> None:
    events = await collect(engine_for(mock, "filtered"), request(TextPart("Hi"), stream=False))
    assert answer(events) == "".join(WORDS)
    assert isinstance(events[-1], Finished) and events[-1].reason == "content_filter"


async def test_upstream_that_ignores_stream_true_still_works(mock: MockServer) -> None:
    events = await collect(engine_for(mock, "json"), request(TextPart("Hi")))
    assert texts(events) == ["whole answer"] and events[-1] == Finished("length", 5, 2)


async def test_images_arrive_as_png_data_urls(mock: MockServer) -> None:
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    req = request(ImagePart(image), TextPart("What is this?"))
    engine = engine_for(mock, "ok")
    assert engine.count_prompt_tokens(req) == 6 + 1  # ceil((9 + 13) / 4) text + 1 image
    await collect(engine, req)
    content = mock.app.bodies[req.request_id][0]["messages"][1]["content"]
    assert content[1] == {"type": "text", "text": "What is this?"}
    url = content[0]["image_url"]["url"]
    assert content[0]["type"] == "image_url" and url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.size == (40, 30)
    assert decoded.convert("RGB").getpixel((5, 5)) == (10, 200, 30)


def test_sse_parser_handles_any_split() -> None:
    stream = (
        b': comment\r\n\r\ndata: {"a": 1}\r\n\r\n'
        b"event: x\ndata: line1\ndata: line2\n\ndata:[DONE]\n\n"
    )
    for size in (1, 2, 3, 7, len(stream)):
        parser = SSEParser()
        events = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i : i + size])
        assert events == [b'{"a": 1}', b"line1\nline2", b"[DONE]"]


# -- the litellm path -------------------------------------------------------------------------
async def litellm_collect(
    mock: MockServer, mode: str, req: EngineRequest | None = None, retries: int = 0
) -> list[EngineEvent]:
    from model.litellm_engine import LiteLLMConfig, LiteLLMEngine

    engine = LiteLLMEngine(
        LiteLLMConfig(
            model_id="served",
            litellm_model=f"openai/{mode}",
            api_base=mock.base_url,
            api_key="sk-upstream",
            retries=retries,
            retry_backoff_s=0.005,
        )
    )
    return await collect(engine, req or request(TextPart("Hi"), temperature=0))


async def test_litellm_routed_provider_streams(mock: MockServer) -> None:
    events = await litellm_collect(mock, "ok")
    assert "".join(texts(events)) == "".join(WORDS)
    assert events[-1] == Finished("stop", 11, 3)


async def test_litellm_errors_map_to_the_same_classes(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    with pytest.raises(UpstreamUnavailable):
        await litellm_collect(mock, "always503", req)
    assert len(mock.app.bodies[req.request_id]) == 1  # litellm's own retries are off
    with pytest.raises(UpstreamBadResponse):
        await litellm_collect(mock, "garbage")


async def test_litellm_retries_before_the_first_token(mock: MockServer) -> None:
    req = request(TextPart("Hi"))
    events = await litellm_collect(mock, "flaky", req, retries=2)
    assert "".join(texts(events)) == "".join(WORDS)
    assert len(mock.app.bodies[req.request_id]) == 2


PASSED = {
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "a"}}],
    "tool_choice": "required",
    "logprobs": True,
    "top_logprobs": 1,
}


async def test_parameters_pass_through_and_calls_come_back_as_call_text(mock: MockServer) -> None:
    req = request(TextPart("Hi"), json_schema='{"type":"object"}')
    req = replace(req, passthrough_json=json.dumps(PASSED))
    events = await collect(engine_for(mock, "toolcalls"), req)
    body = mock.app.bodies[req.request_id][0]
    assert {k: body[k] for k in PASSED} == PASSED  # unchanged; the local grammar is not sent
    first, calls = [e for e in events if isinstance(e, TextDelta)]
    assert first.text == "Hi"
    assert first.logprobs == (
        TokenLogprob("Hi", -0.5, (72, 105), (TopLogprob("Hi", -0.5, (72, 105)),)),
    )
    assert json.loads(calls.text) == [
        {"name": "a", "parameters": {"x": 1}},
        {"name": "b", "parameters": {}},
    ]
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"


async def test_tool_history_is_sent_as_openai_messages(mock: MockServer) -> None:
    turns = (
        ChatTurn("user", (TextPart("Hi"),)),
        ChatTurn("assistant", (TextPart(""),), tool_calls=(ToolCall("c1", "a", '{"x":1}'),)),
        ChatTurn("tool", (TextPart("42"),), tool_call_id="c1"),
    )
    req = EngineRequest("req-history", turns, SamplingParams(max_tokens=4), stream=False)
    events = await collect(engine_for(mock, "toolcalls"), req)
    assert mock.app.bodies["req-history"][0]["messages"] == [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    (whole,) = texts(events)
    assert json.loads(whole)[0] == {"name": "a", "parameters": {"x": 1}}
