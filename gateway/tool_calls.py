"""Function calling with Llama 3.1/3.2's JSON format, as the checkpoint's chat template defines it.

The template (checked in `model/llama_chat_template.py`, a verbatim copy of the checkpoint's) takes
`tools` and, by default, writes them into the first user message, asking for
`{"name": function name, "parameters": dictionary of argument name and its value}`; an assistant
turn may carry exactly one tool call ("This model only supports single tool-calls at once!"),
rendered in the same JSON; a `tool` message becomes an `ipython` turn. What it rules out is
refused with a 400: more than one call in one assistant message, and tools together with an image
in the first user message (the template would write the message's parts as a Python list).
So a response holds at most one call whatever `parallel_tool_calls` says.

`tool_choice`: `none` renders no tools (the template has no "tools known, do not call" mode);
`auto` renders them and reads a call out of the answer when it is one; `required` and a named
function also force the answer through a grammar: `{"name": <one of the names>, "parameters":
<that function's parameters schema>}`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.errors import InvalidRequest
from gateway.wire_shapes import AssistantMessage, ToolCall
from model.schema_check import SchemaError, canonical_schema

if TYPE_CHECKING:
    from gateway.protocol import ChatCompletionRequest


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text

    def openai(self, call_id: str) -> ToolCall:
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def tool_names(request: ChatCompletionRequest) -> list[str]:
    return [t.function.name for t in request.tools or []]


def forced_names(request: ChatCompletionRequest) -> list[str] | None:
    """The names a forced call must use (None: no call is forced)."""
    choice = request.tool_choice
    if not request.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return tool_names(request)
    assert not isinstance(choice, str)
    return [choice.function.name]


def tools_active(request: ChatCompletionRequest) -> bool:
    """Whether the model is shown the tools (and its answer may be a call)."""
    return bool(request.tools) and request.tool_choice != "none"


def tools_json(request: ChatCompletionRequest) -> str | None:
    if not tools_active(request):
        return None
    return json.dumps([t.model_dump(exclude_none=True) for t in request.tools or []])


def check_tools(request: ChatCompletionRequest) -> None:
    """400s for what the template or OpenAI's API rules out."""
    names = tool_names(request)
    if len(set(names)) != len(names):
        raise _invalid("Function names in 'tools' must be unique.", "tools")
    choice = request.tool_choice
    if choice not in (None, "none") and not request.tools:
        raise _invalid("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise _invalid(
            f"Invalid 'tool_choice': no function named '{choice.function.name}' in 'tools'.",
            "tool_choice",
        )
    call_ids: set[str] = set()
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        call_ids.update(c.id for c in message.tool_calls or [])
        if message.role == "tool":
            if not message.tool_call_id:
                raise _invalid(f"Missing required parameter: '{where}.tool_call_id'.", where)
            if message.tool_call_id not in call_ids:
                raise _invalid(
                    f"Invalid '{where}.role': messages with role 'tool' must answer a "
                    "preceding assistant message's 'tool_calls'.",
                    f"{where}.role",
                )
            if message.content is None or not message.text_only():
                raise _invalid(f"'{where}.content' must be text for a tool message.", where)
        elif message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise _invalid(f"Missing required parameter: '{where}.content'.", f"{where}.content")
        calls = message.tool_calls or []
        if calls and message.role != "assistant":
            raise _invalid(f"Only assistant messages may carry 'tool_calls' ({where}).", where)
        if len(calls) > 1:
            raise _invalid(
                "This model's chat template takes one tool call per assistant message; "
                f"'{where}.tool_calls' has {len(calls)}.",
                f"{where}.tool_calls",
            )
        for j, call in enumerate(calls):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise _invalid(
                    f"'{where}.tool_calls[{j}].function.arguments' must be a JSON object.",
                    f"{where}.tool_calls[{j}].function.arguments",
                )
    if tools_active(request):
        first = next((m for m in request.messages if m.role not in ("system", "developer")), None)
        if first is None or first.role != "user":
            raise _invalid(
                "With 'tools', the conversation needs a user message first: the model's chat "
                "template writes the tools into it.",
                "messages",
            )
        if not first.text_only():
            raise _invalid(
                "'tools' cannot be combined with an image in the first user message: the "
                "model's chat template writes the tools into that message as text only.",
                "tools",
            )


def tool_call_schema(request: ChatCompletionRequest) -> str | None:
    """The grammar's schema for a forced call (None when no call is forced)."""
    names = forced_names(request)
    if names is None:
        return None
    variants = []
    for i, tool in enumerate(request.tools or []):
        if tool.function.name not in names:
            continue
        parameters = tool.function.parameters or {"type": "object", "properties": {}}
        try:
            canonical_schema(parameters)
        except SchemaError as exc:
            raise InvalidRequest(
                f"Invalid parameters schema for function '{tool.function.name}': {exc}.",
                param=f"tools[{i}].function.parameters",
                code="invalid_json_schema",
            ) from None
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.function.name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return canonical_schema(schema)


def parse_tool_calls(text: str, names: list[str]) -> list[ParsedToolCall]:
    """The calls in a completion's text, in the template's format (one object; an upstream's
    several calls come as an array); [] when the text is not calls."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith(("{", "[")):
        return []
    try:
        value = json.loads(body)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        arguments = item.get("parameters", item.get("arguments", {}))
        if not isinstance(arguments, dict):
            return []
        calls.append(ParsedToolCall(str(item["name"]), json.dumps(arguments, ensure_ascii=False)))
    return calls


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def calls_in_answer(request: ChatCompletionRequest, text: str, reason: str) -> list[ParsedToolCall]:
    """The tool calls a finished completion makes (only a complete answer can hold one)."""
    if not tools_active(request) or reason != "stop":
        return []
    return parse_tool_calls(text, forced_names(request) or tool_names(request))


def answer_message(
    request: ChatCompletionRequest, text: str, reason: str, upstream_calls: str = ""
) -> tuple[AssistantMessage, str]:
    """A non-streamed choice's `message` and `finish_reason`: calls, or the text.

    `upstream_calls`: an upstream's structured calls as call text (its content is `text`)."""
    if upstream_calls:
        calls = calls_in_answer(request, upstream_calls, reason)
        if not calls:
            return {"role": "assistant", "content": text + upstream_calls}, reason
    else:
        calls = calls_in_answer(request, text, reason)
        if not calls:
            return {"role": "assistant", "content": text}, reason
        text = ""
    tool_calls = [call.openai(new_call_id()) for call in calls]
    message: AssistantMessage = {
        "role": "assistant",
        "content": text or None,
        "tool_calls": tool_calls,
    }
    return message, "tool_calls"
