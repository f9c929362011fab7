"""Streaming a choice that may be a tool call: text is held while it may still be a call.

With tools shown to the model (`tool_choice` auto), an answer that starts with `{` may be a
call in the template's JSON format; it is held until the end (when it may be parsed whole and
the output guards have passed all of it), then sent as OpenAI streams calls: a first delta with
the call's index, id, type and name (arguments empty), then the arguments, then
`finish_reason: "tool_calls"`. An answer that starts otherwise streams as text at once. A forced
call (`required` or a named function) is always held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.tool_calls import forced_names, new_call_id, parse_tool_call, tool_names, tools_active

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

    def feed(self, released: str) -> str:
        """Text that moderation released; returns what may be sent as content now."""
        if self._text:
            return released
        self._held += released
        start = self._held.lstrip()
        if self._forced or not start or start.startswith("{"):
            return ""
        self._text = True
        out, self._held = self._held, ""
        return out

    def finish(self, reason: str) -> tuple[str, list[dict[str, Any]]]:
        """At the end: (text still to send, tool-call deltas); deltas replace the text."""
        held, self._held = self._held, ""
        call = parse_tool_call(held, self._names) if reason == "stop" and held else None
        if call is None:
            return held, []
        call_id = new_call_id()
        deltas: list[dict[str, Any]] = [
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        ]
        for start in range(0, len(call.arguments), ARGUMENT_PIECE):
            piece = call.arguments[start : start + ARGUMENT_PIECE]
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return "", deltas
