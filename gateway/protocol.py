"""OpenAI Chat Completions request models, and their conversion to engine parameters.

Parsing is strict about types (a string where a number belongs is a 400, as with OpenAI) and
lenient about unknown fields (ignored and logged). Known OpenAI parameters that this gateway
does not implement are refused with `param` naming them, unless their value changes nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from gateway.errors import InvalidRequest
from gateway.tool_calls import check_tools, tool_call_schema
from model.engine import SamplingParams
from model.logprobs import MAX_TOP_LOGPROBS
from model.schema_check import JSON_OBJECT_SCHEMA, SchemaError, canonical_schema

# Known OpenAI parameters we do not implement, with the values that change nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "verbosity": (None,),
}
# Sent on unchanged to upstream engines (local engines implement them themselves).
PASSTHROUGH = {
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
}
# Accepted and ignored: they only label the request.
_IGNORED_KNOWN = {"prompt_cache_key", "safety_identifier"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextContentPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContentPart | ImageContentPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that carries tool calls.
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_not_empty(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(value, list) and not value:
            raise ValueError("content must not be an empty list")
        return value

    def text_only(self) -> bool:
        return (
            self.content is None
            or isinstance(self.content, str)
            or all(isinstance(p, TextContentPart) for p in self.content)
        )

    def image_urls(self) -> list[str]:
        if self.content is None or isinstance(self.content, str):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImageContentPart)]


class StreamOptions(_Model):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Model):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=8)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The response format's schema, checked and canonical (set by check_semantics).
    _json_schema: str | None = PrivateAttr(default=None)

    @field_validator("messages")
    @classmethod
    def _messages_not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must contain at least one message")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_shape(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > 4:
                raise ValueError("stop may hold at most 4 sequences")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
        return value

    # -- parsing -------------------------------------------------------------------------
    @classmethod
    def parse(cls, body: bytes) -> tuple[ChatCompletionRequest, list[str]]:
        """Parse a JSON body; returns the request and the unknown field names (to log)."""
        try:
            request = cls.model_validate_json(body)
        except ValidationError as exc:
            raise _to_invalid_request(exc) from None
        unknown = request.check_extras()
        request.check_semantics()
        return request, unknown

    def check_extras(self) -> list[str]:
        unknown: list[str] = []
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL:
                if value not in _NEUTRAL[name]:
                    raise InvalidRequest(
                        f"'{name}' is not supported by this model server.",
                        param=name,
                        code="unsupported_parameter",
                    )
            elif name not in _IGNORED_KNOWN:
                unknown.append(name)
        return unknown

    def check_semantics(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequest(
                "Set either 'max_tokens' or 'max_completion_tokens', not two different values.",
                param="max_completion_tokens",
                code="invalid_value",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "'top_logprobs' requires 'logprobs' to be true.",
                param="top_logprobs",
                code="invalid_value",
            )
        self._json_schema = self._checked_response_schema()
        check_tools(self)
        tool_schema = tool_call_schema(self)
        if tool_schema is not None:
            if self._json_schema is not None:
                raise InvalidRequest(
                    "'response_format' cannot be combined with a forced tool call "
                    "('tool_choice' required or a named function).",
                    param="response_format",
                    code="invalid_value",
                )
            self._json_schema = tool_schema
        for i, message in enumerate(self.messages):
            if message.role != "user" and not message.text_only():
                raise InvalidRequest(
                    f"Invalid 'messages[{i}].content': images are only allowed in user messages.",
                    param=f"messages[{i}].content",
                    code="invalid_value",
                )

    def _checked_response_schema(self) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return JSON_OBJECT_SCHEMA
        param = "response_format.json_schema"
        if fmt.json_schema is None:
            raise InvalidRequest(
                f"Missing required parameter: '{param}'.",
                param=param,
                code="missing_required_parameter",
            )
        schema = fmt.json_schema.schema_
        if schema is None:  # OpenAI: no schema means any JSON object
            return JSON_OBJECT_SCHEMA
        try:
            return canonical_schema(schema)
        except SchemaError as exc:
            raise InvalidRequest(
                f"Invalid schema for response_format '{fmt.json_schema.name}': {exc}.",
                param=f"{param}.schema",
                code="invalid_json_schema",
            ) from None

    # -- conversion ----------------------------------------------------------------------
    def passthrough_json(self) -> str | None:
        """The parameters an upstream engine gets unchanged (None when the client sent none)."""
        fields = self.model_dump(include=PASSTHROUGH, exclude_none=True, by_alias=True, mode="json")
        return json.dumps(fields) if fields else None

    @property
    def json_schema(self) -> str | None:
        """The canonical JSON schema the completion must match (None: free text)."""
        return self._json_schema

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,) if self.stop else ()
        return tuple(self.stop)

    def image_urls(self) -> list[str]:
        return [url for m in self.messages for url in m.image_urls()]

    def sampling_params(self, max_tokens: int, choice_index: int = 0) -> SamplingParams:
        """Engine parameters for one choice; with `n` > 1 and a seed, each choice gets its own."""
        seed = self.seed + choice_index if self.seed is not None else None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=seed,
            stop=self.stop_sequences,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            json_schema=self._json_schema,
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[...]") or "[" in str(part) or part.endswith("Part"):
            # Union branch names from pydantic add noise; drop them.
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        )
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    param = _loc_to_param(tuple(first["loc"]))
    if first["type"] == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    if first["type"] == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: '{param}'.",
            param=param,
            code="unknown_parameter",
        )
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"Invalid '{param}': {message}.", param=param, code="invalid_value")
