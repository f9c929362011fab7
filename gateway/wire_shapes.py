"""The OpenAI (and Azure content-filter) response shapes the gateway writes, as `TypedDict`s.

The hot path builds these as plain dict literals (a `TypedDict` is a type checker's view of a
dict: nothing at run time), so mypy checks every place that writes one against the wire format.
The filter results and logprobs objects are built in `guards.content_filter` and
`model.logprobs`, which do not import the gateway: here they are open dicts.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, Required, TypedDict

# `content_filter_results` of a choice or a prompt (built by `guards.content_filter`).
ContentFilterResults = dict[str, Any]
# A choice's or a chunk's `logprobs` object (built by `model.logprobs.openai_logprobs`).
Logprobs = dict[str, Any]


class PromptFilterResult(TypedDict):
    """An entry of `prompt_filter_results` (Azure's: the input guards' results per prompt)."""

    prompt_index: int
    content_filter_results: ContentFilterResults


class PromptTokensDetails(TypedDict):
    cached_tokens: int
    image_tokens: int  # also counted in `prompt_tokens`


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: None


class FunctionCall(TypedDict):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(TypedDict):
    """A non-streamed choice's `message`."""

    role: Literal["assistant"]
    content: str | None  # None only beside `tool_calls`
    tool_calls: NotRequired[list[ToolCall]]


class Choice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: Logprobs | None
    finish_reason: str
    content_filter_results: ContentFilterResults


class ChatCompletion(TypedDict):
    """A non-streamed answer (`object: chat.completion`)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    prompt_filter_results: list[PromptFilterResult]
    usage: Usage
    system_fingerprint: str


class FunctionCallDelta(TypedDict, total=False):
    name: str
    arguments: str


class ToolCallDelta(TypedDict, total=False):
    """A streamed piece of a tool call: the head (id, type, name), then its arguments."""

    index: Required[int]
    id: str
    type: Literal["function"]
    function: FunctionCallDelta


class Delta(TypedDict, total=False):
    """A chunk choice's `delta`: the role first, then content or tool calls, then `{}`."""

    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallDelta]


class ChunkChoice(TypedDict):
    index: int
    delta: Delta
    logprobs: Logprobs | None
    finish_reason: str | None
    content_filter_results: ContentFilterResults


class ChatCompletionChunk(TypedDict):
    """One SSE event of a streamed answer (`object: chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]  # empty only in the usage chunk
    prompt_filter_results: NotRequired[list[PromptFilterResult]]  # on the first chunk
    usage: NotRequired[Usage | None]  # with `stream_options.include_usage`: null but last
