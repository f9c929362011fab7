"""Streaming a choice that may be a tool call: text is held while it may still be a call.

With tools shown to the model (`tool_choice` auto), an answer that starts with `{` may be a
call in the template's JSON format; it is held until the end (when it may be parsed whole and
the output guards have passed all of it), then sent as OpenAI streams calls: a first delta with
the call's index, id, type and name (arguments empty), then the arguments, then
`finish_reason: "tool_calls"`. An answer that starts otherwise streams as text at once. A forced
call (`required` or a named function) is always held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.tool_calls import (
    ParsedToolCall,
    forced_names,
    new_call_id,
    parse_tool_calls,
    tool_names,
    tools_active,
)
from gateway.wire_shapes import Delta, ToolCallDelta

if TYPE_CHECKING:
    from gateway.protocol import ChatCompletionRequest

# Arguments go out in pieces of this many characters (clients assemble them).
ARGUMENT_PIECE = 64


class ToolCallStream:
    def __init__(self, request: ChatCompletionRequest) -> None:
        self._active = tools_active(request)
        forced = forced_names(request)
        self._forced = forced is not None
        self._names = forced or tool_names(request)
        self._held = ""
        self._text = not self._active  # decided: plain text, streamed as it comes
        self._seen = 0  # characters the engine produced so far
        self._sent = 0  # characters released by moderation so far
        self._calls_from: int | None = None  # where an upstream's call text starts
        self._calls = ""

    def produced(self, text: str, tool_calls: bool) -> None:
        """An engine delta (before moderation): remembers where an upstream's calls begin."""
        if tool_calls and self._active and self._calls_from is None:
            self._calls_from = self._seen
        self._seen += len(text)

    def feed(self, released: str) -> str:
        """Text that moderation released; returns what may be sent as content now."""
        start_at, self._sent = self._sent, self._sent + len(released)
        if self._calls_from is not None and self._sent > self._calls_from:
            cut = max(0, self._calls_from - start_at)
            self._calls += released[cut:]
            released = released[:cut]
        return self._content(released) if released else ""

    def _content(self, released: str) -> str:
        if self._text:
            return released
        self._held += released
        start = self._held.lstrip()
        if self._forced or not start or start.startswith(("{", "[")):
            return ""
        self._text = True
        out, self._held = self._held, ""
        return out

    def finish(self, reason: str) -> tuple[str, list[Delta]]:
        """At the end: (text still to send, tool-call deltas); deltas replace the text."""
        held, self._held = self._held, ""
        if self._calls:  # an upstream's calls: content (if any) was text, sent or held
            calls = parse_tool_calls(self._calls, self._names) if reason == "stop" else []
            if not calls:
                return held + self._calls, []
            return held, self._call_deltas(calls)
        calls = parse_tool_calls(held, self._names) if reason == "stop" and held else []
        if not calls:
            return held, []
        return "", self._call_deltas(calls)

    @staticmethod
    def _call_deltas(calls: list[ParsedToolCall]) -> list[Delta]:
        deltas: list[Delta] = []
        for index, call in enumerate(calls):
            head: ToolCallDelta = {
                "index": index,
                "id": new_call_id(),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            deltas.append({"tool_calls": [head]})
            for start in range(0, len(call.arguments), ARGUMENT_PIECE):
                piece = call.arguments[start : start + ARGUMENT_PIECE]
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return deltas
