"""Pure pieces of structured outputs: streamed logprobs follow moderated text; tool-call
parsing and streaming decisions."""

from __future__ import annotations

import json

from gateway.logprob_stream import HeldLogprobs
from gateway.protocol import ChatCompletionRequest
from gateway.tool_calls import parse_tool_calls
from gateway.tool_stream import ToolCallStream
from model.engine import TokenLogprob


def entry(token: str) -> TokenLogprob:
    return TokenLogprob(token, -1.0, tuple(token.encode()))


def test_logprobs_leave_only_with_the_text_they_spell() -> None:
    held = HeldLogprobs()
    held.add("Hel", (entry("Hel"),))
    held.add("lo", (entry("lo"),))
    held.add(" world", (entry(" world"),))
    assert held.release(2) == []  # "He": the first token's text is not all out yet
    assert [e.token for e in held.release(3)] == ["Hel", "lo"]
    assert held.release(3) == []  # " wo" of " world"
    assert [e.token for e in held.release(3)] == [" world"]


def test_withheld_text_keeps_its_logprobs_back() -> None:
    held = HeldLogprobs()
    held.add("safe ", (entry("safe "),))
    held.add("BLOCKED", (entry("BLOCKED"),))
    assert [e.token for e in held.release(5)] == ["safe "]  # moderation stops here


def request(**fields: object) -> ChatCompletionRequest:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        **fields,
    }
    parsed, _ = ChatCompletionRequest.parse(json.dumps(body).encode())
    return parsed


def test_auto_streams_text_at_once_and_holds_what_may_be_a_call() -> None:
    text = ToolCallStream(request(tool_choice="auto"))
    assert text.feed("  Hello") == "  Hello"
    held = ToolCallStream(request(tool_choice="auto"))
    assert held.feed(' {"name": "f", ') == ""
    assert held.feed('"parameters": {"a": 1}}') == ""
    tail, deltas = held.finish("stop")
    assert tail == ""
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    pieces = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(pieces) == {"a": 1}


def test_a_held_answer_that_is_no_call_comes_back_as_text() -> None:
    stream = ToolCallStream(request(tool_choice="auto"))
    assert stream.feed('{"not": "a call"}') == ""
    assert stream.finish("stop") == ('{"not": "a call"}', [])
    cut = ToolCallStream(request(tool_choice="auto"))
    cut.feed('{"name": "f", "param')
    assert cut.finish("length") == ('{"name": "f", "param', [])


def test_parse_accepts_only_known_names_and_object_arguments() -> None:
    assert parse_tool_calls('{"name": "f", "parameters": {}}', ["f"])[0].arguments == "{}"
    assert parse_tool_calls('{"name": "g", "parameters": {}}', ["f"]) == []
    assert parse_tool_calls('{"name": "f", "parameters": [1]}', ["f"]) == []
    assert parse_tool_calls("f()", ["f"]) == []
    two = parse_tool_calls('[{"name": "f", "parameters": {"x": 1}}, {"name": "f"}]', ["f"])
    assert [json.loads(c.arguments) for c in two] == [{"x": 1}, {}]
