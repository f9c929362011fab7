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

Role = Literal["system", "user", "assistant"]
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
class ChatTurn:
    role: Role
    parts: tuple[TextPart | ImagePart, ...]

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

    @property
    def images(self) -> list[Image]:
        return [img for turn in self.messages for img in turn.images]


@dataclass(frozen=True)
class TextDelta:
    text: str


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


@runtime_checkable
class Engine(Protocol):
    """Anything that turns chat requests into streams of text."""

    @property
    def info(self) -> EngineInfo: ...

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
