"""Tool calls, logprobs and pass-through parameters on the OpenAI wire (upstream engines).

Upstream routes pass `response_format`, `tools`, `tool_choice`, `parallel_tool_calls`,
`logprobs` and `top_logprobs` through unchanged (`EngineRequest.passthrough_json`), and
conversations with tool calls and tool results as OpenAI messages. An upstream's tool calls come
back as text in the Llama 3.1 JSON format (`{"name", "parameters"}`; several calls as a JSON
array), the same text a local model writes: the gateway then guards and returns them exactly as
it does a local model's calls (`gateway.tool_calls`). Upstream logprobs become `TokenLogprob`s
on the deltas they came with.
"""

from __future__ import annotations

import json
from typing import Any

from model.engine import ChatTurn, EngineRequest, TextPart, TokenLogprob, TopLogprob


def passthrough_fields(request: EngineRequest) -> dict[str, Any]:
    if request.passthrough_json is None:
        return {}
    fields = json.loads(request.passthrough_json)
    return fields if isinstance(fields, dict) else {}


def tool_turn_message(turn: ChatTurn) -> dict[str, Any] | None:
    """The OpenAI message of an assistant turn with calls or of a tool result (else None)."""
    text = "\n".join(p.text for p in turn.parts if isinstance(p, TextPart))
    if turn.tool_calls:
        calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in turn.tool_calls
        ]
        return {"role": turn.role, "content": text or None, "tool_calls": calls}
    if turn.role == "tool":
        return {"role": "tool", "tool_call_id": turn.tool_call_id, "content": text}
    return None


def _bytes(raw: object, token: str) -> tuple[int, ...]:
    if isinstance(raw, list) and all(isinstance(b, int) for b in raw):
        return tuple(raw)
    return tuple(token.encode())


def logprob_entries(logprobs: object) -> tuple[TokenLogprob, ...]:
    """A choice's `logprobs` object -> entries (malformed entries are skipped)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    out: list[TokenLogprob] = []
    for item in content if isinstance(content, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            continue
        token = item["token"]
        top = tuple(
            TopLogprob(t["token"], float(t.get("logprob", 0.0)), _bytes(t.get("bytes"), t["token"]))
            for t in item.get("top_logprobs") or ()
            if isinstance(t, dict) and isinstance(t.get("token"), str)
        )
        out.append(
            TokenLogprob(
                token, float(item.get("logprob", 0.0)), _bytes(item.get("bytes"), token), top
            )
        )
    return tuple(out)


def _as_text(calls: list[tuple[str, str]]) -> str:
    def one(name: str, arguments: str) -> dict[str, Any]:
        try:
            parameters: Any = json.loads(arguments) if arguments else {}
        except ValueError:
            parameters = arguments  # not JSON: the gateway returns it as text, not as a call
        return {"name": name, "parameters": parameters}

    values = [one(n, a) for n, a in calls]
    return json.dumps(values[0] if len(values) == 1 else values, ensure_ascii=False)


def calls_text(tool_calls: object) -> str:
    """A whole message's `tool_calls` -> the call text ("" when there is none)."""
    calls = []
    for call in tool_calls if isinstance(tool_calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            calls.append((function["name"], str(function.get("arguments") or "")))
    return _as_text(calls) if calls else ""


class ToolCallAssembler:
    """Streamed `delta.tool_calls` pieces, joined by index."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # index -> [name, arguments]

    def add(self, pieces: object) -> None:
        for piece in pieces if isinstance(pieces, list) else ():
            if not isinstance(piece, dict):
                continue
            call = self._calls.setdefault(int(piece.get("index", 0)), ["", ""])
            function = piece.get("function") or {}
            if isinstance(function, dict):
                call[0] += str(function.get("name") or "")
                call[1] += str(function.get("arguments") or "")

    def take_text(self) -> str:
        """The calls so far as text ("" when none), and forget them."""
        calls = [(n, a) for _, (n, a) in sorted(self._calls.items()) if n]
        self._calls.clear()
        return _as_text(calls) if calls else ""
