"""The engine interface: what the gateway needs from anything that generates text.

The gateway hands an `EngineRequest` (a conversation with decoded images and sampling
parameters) to `Engine.generate`, and reads an async stream of `TextDelta` events that always
ends with one `Finished` event carrying the finish reason and exact token counts. Closing the
stream early (client gone) cancels the request and frees its place in the batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL.Image import Image

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
# Whose fault an error is: "request" (its own input; the client gets a 4xx with the error's
# text, which engines write for clients) or "server" (a 500 that never shows the error's text).
Fault = Literal["server", "request"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    image: Image


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made in an earlier turn."""

    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    parts: tuple[TextPart | ImagePart, ...]
    # An assistant turn's function calls; a `tool` turn answers the call `tool_call_id`.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def images(self) -> list[Image]:
        return [p.image for p in self.parts if isinstance(p, ImagePart)]


GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A JSON schema (canonical JSON text) the completion must match, enforced token by token
    # (`model.grammar`); `{"type": "object"}` for OpenAI's JSON mode. None: free text.
    json_schema: str | None = None
    # None: no logprobs. 0..20: each token's logprob and that many alternatives.
    top_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow float32: the same cut-off as vLLM.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    messages: tuple[ChatTurn, ...]
    sampling: SamplingParams
    # Whether the client reads the answer as it is made. Local engines stream either way; an
    # upstream engine fetches a non-streamed answer in one piece (one response to parse, not
    # an SSE event per token, and the upstream writes it once).
    stream: bool = True
    # The functions the model may call: OpenAI `tools` entries as a JSON array (None: none),
    # rendered by the checkpoint's chat template.
    tools_json: str | None = None
    # Upstream engines only: OpenAI parameters sent on unchanged (response_format, tools,
    # tool_choice, logprobs...), as a JSON object.
    passthrough_json: str | None = None

    @property
    def images(self) -> list[Image]:
        return [img for turn in self.messages for img in turn.images]


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, with the most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # The tokens whose text this delta completes (only when the request asked for logprobs).
    logprobs: tuple[TokenLogprob, ...] = ()
    # True when the text is tool calls in the Llama JSON format, made from an upstream's
    # structured `tool_calls` (after any content text); local models' calls are plain text.
    tool_calls: bool = False
    # How many generated tokens this delta stands for: what a stream the client leaves early
    # is charged (an upstream's deltas merged from one read carry their sum).
    tokens: int = 1


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    fault: Fault = "server"


EngineEvent = TextDelta | Finished


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    context_length: int
    max_batch_size: int
    device: str
    dtype: str
    extra: dict[str, str] = field(default_factory=dict)
    # True when the engine's `prompt_tokens` count each image as its one `<|image|>` placeholder
    # (the local engines): the gateway then counts the image as its vision tokens instead. An
    # upstream's own usage is reported as the upstream counted it.
    image_placeholder_usage: bool = False


@runtime_checkable
class Engine(Protocol):
    """Anything that turns chat requests into streams of text.

    The engines subclass it explicitly: they inherit the defaults of the optional members
    (`cheap_token_count`), and a member they lack is an error where they are built (mypy:
    an abstract class), not where a request first reads it.
    """

    @property
    def info(self) -> EngineInfo: ...

    @property
    def cheap_token_count(self) -> bool:
        """True when `count_prompt_tokens` costs microseconds (an estimate, no tokenizer): the
        gateway then counts on the event loop instead of in a thread."""
        return False

    def ready(self) -> bool:
        """True once weights are loaded and requests can be served."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop taking requests; running ones end (their streams finish)."""
        ...

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        """Exact prompt tokens of the templated conversation (for limits and usage)."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream text deltas, then one `Finished`. Closing the iterator cancels the request."""
        ...
