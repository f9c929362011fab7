"""The OpenAI wire protocol shared by `model.upstream` and `model.litellm_engine`.

- Requests: engine requests become OpenAI bodies (images re-encoded as PNG data URLs; sampling
  parameters as body fields).
- Answers: incremental SSE parsing, upstream finish reasons mapped to ours, usage taken over.
- Errors: `model.errors.UpstreamError` and its subclasses (both engines raise them).
- Retries: `with_retries` retries retryable errors only while no delta has been sent.
- Token counts: exact with a local tokenizer's chat template, else the estimate
  ceil(characters of all text parts / 4) + 1 per image (each image is its one `<|image|>`
  token in the text sequence, as the local engine counts it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import orjson
from PIL.Image import Image

from model.engine import (
    ChatTurn,
    EngineEvent,
    EngineRequest,
    Finished,
    FinishReason,
    ImagePart,
    TextDelta,
    TextPart,
)
from model.errors import UpstreamBadResponse, UpstreamError, UpstreamUnavailable
from model.wire_extras import (
    ToolCallAssembler,
    calls_text,
    logprob_entries,
    passthrough_fields,
    tool_turn_message,
)

# The engine protocol's FinishReason has no "content_filter" yet; the gateway passes any
# reason other than error/cancelled through to the client's `finish_reason` unchanged.
CONTENT_FILTER = cast(FinishReason, "content_filter")
_FINISH_MAP: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": CONTENT_FILTER,
    # Other providers' spellings (through litellm or OpenAI-like servers).
    "max_tokens": "length",
    "eos": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_calls": "stop",
    "function_call": "stop",
}
# An upstream that never ends a line is broken, not slow: cap what one SSE line may hold.
_MAX_SSE_LINE = 4 * 1024 * 1024
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


def json_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes, with orjson (faster than json.dumps on the hot path:
    request bodies, responses, every SSE chunk). Falls back to json for what orjson refuses
    (integers beyond 64 bits, non-string keys), so any value json accepted still encodes."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def json_loads(data: bytes | str) -> Any:
    """json.loads with orjson's speed; what orjson refuses but json accepts (lone surrogate
    escapes, NaN, integers beyond 64 bits) is still parsed, by json."""
    try:
        return orjson.loads(data)
    except ValueError:
        return json.loads(data)


def map_finish_reason(raw: object) -> FinishReason:
    """Upstream finish_reason -> ours; unknown or missing reasons are a normal stop."""
    return _FINISH_MAP.get(raw, "stop") if isinstance(raw, str) else "stop"


def estimate_prompt_tokens(turns: tuple[ChatTurn, ...]) -> int:
    """ceil(text characters / 4) + 1 per image: a cheap, documented over-the-wire estimate."""
    chars = images = 0
    for turn in turns:
        for part in turn.parts:
            if isinstance(part, TextPart):
                chars += len(part.text)
            else:
                images += 1
    return max(1, math.ceil(chars / 4) + images)


def png_data_url(image: Image) -> str:
    """Re-encode a decoded image losslessly; compress_level=1 because CPU matters more here
    than bytes on a data-centre link (the default level costs several times the CPU for files
    only somewhat smaller; bench/NOTES.md)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_messages(turns: tuple[ChatTurn, ...]) -> list[dict[str, Any]]:
    """Engine turns -> OpenAI messages; a lone text part stays a plain string."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        if (message := tool_turn_message(turn)) is not None:
            out.append(message)
            continue
        if len(turn.parts) == 1 and isinstance(turn.parts[0], TextPart):
            out.append({"role": turn.role, "content": turn.parts[0].text})
            continue
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, ImagePart):
                url = png_data_url(part.image)
                content.append({"type": "image_url", "image_url": {"url": url}})
            else:
                content.append({"type": "text", "text": part.text})
        out.append({"role": turn.role, "content": content})
    return out


async def build_messages(request: EngineRequest) -> list[dict[str, Any]]:
    # PNG encoding is tens of ms for a large image: keep it off the event loop.
    if request.images:
        return await asyncio.to_thread(openai_messages, request.messages)
    return openai_messages(request.messages)


def sampling_fields(request: EngineRequest) -> dict[str, Any]:
    """SamplingParams -> OpenAI body fields; defaults are left out so upstreams use theirs."""
    s = request.sampling
    body: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": s.temperature}
    if s.top_p != 1.0:
        body["top_p"] = s.top_p
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    # response_format, tools, logprobs...: as the client sent them (never the local grammar).
    return body | passthrough_fields(request)


class PromptCounter:
    """Exact prompt tokens with a local tokenizer's chat template, else the estimate."""

    def __init__(self, tokenizer_path: Path | None) -> None:
        self._path = tokenizer_path
        self._count: Callable[[tuple[ChatTurn, ...]], int] | None = None

    @property
    def exact(self) -> bool:
        return self._path is not None

    def load(self) -> None:
        if self._path is None or self._count is not None:
            return
        from transformers import AutoTokenizer

        from model.encoding import PromptEncoder

        # Counts run in many request threads at once: through the tokenizer's one owner.
        encoder = PromptEncoder(AutoTokenizer.from_pretrained(str(self._path)))
        self._count = encoder.count

    def __call__(self, turns: tuple[ChatTurn, ...]) -> int:
        if self._count is None:
            return estimate_prompt_tokens(turns)
        return self._count(turns)


class SSEParser:
    """Incremental SSE: feed raw bytes, get each complete event's `data` as soon as it ends."""

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        if len(self._tail) > _MAX_SSE_LINE:
            raise UpstreamBadResponse("The upstream sent an SSE line over 4 MiB.")
        events: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # a blank line ends the event
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":" keep-alives), event:, id: and retry: lines carry nothing for us
        return events


@dataclass
class StreamState:
    """What one generation has seen so far, across attempts."""

    deltas: int = 0
    finish: str | None = None
    done: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: ToolCallAssembler = field(default_factory=ToolCallAssembler)

    def reset(self) -> None:
        self.finish, self.done, self.prompt_tokens, self.completion_tokens = None, False, None, None
        self.tool_calls = ToolCallAssembler()

    def take_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self.prompt_tokens, self.completion_tokens = prompt, completion


def stream_error(error: object) -> UpstreamError:
    """An error object sent inside a stream (as this gateway and vLLM do)."""
    info = error if isinstance(error, dict) else {}
    message = str(info.get("message") or error)
    # Only server-side failures are worth another try; a refusal (400, content_filter) is not.
    kind, code = info.get("type"), info.get("code")
    if kind == "server_error" or (kind is None and code in (None, "service_unavailable")):
        return UpstreamUnavailable(f"The upstream failed: {message}")
    return UpstreamBadResponse(f"The upstream refused the request: {message}")


def _error_message(body: bytes) -> str:
    try:
        parsed = json_loads(body)
        message = parsed["error"]["message"] if isinstance(parsed["error"], dict) else None
        return str(message or parsed["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"


def status_error(status: int, body: bytes) -> UpstreamError:
    message = f"The upstream answered HTTP {status}: {_error_message(body)}"
    if status == 429 or status >= 500:
        return UpstreamUnavailable(message)
    return UpstreamBadResponse(message)


async def with_retries(
    attempt: Callable[[], AsyncGenerator[EngineEvent, None]],
    state: StreamState,
    finish: Callable[[FinishReason, str | None], Finished],
    *,
    retries: int,
    backoff_s: float,
    deadline: float,
) -> AsyncGenerator[EngineEvent, None]:
    """Run `attempt` until it streams to the end; retry retryable errors only while no delta
    has gone out (a retry after that would repeat text the client already has)."""
    loop = asyncio.get_running_loop()
    tries = 0
    while True:
        try:
            # aclosing: a client that leaves must close the HTTP response now, not at GC.
            async with aclosing(attempt()) as events:
                async for event in events:
                    yield event
            break
        except UpstreamError as exc:
            if state.deltas:
                yield finish("error", exc.message)
                return
            backoff = backoff_s * (2**tries) * (0.5 + random.random())
            if not exc.retryable or tries >= retries or loop.time() + backoff > deadline:
                raise
            tries += 1
            state.reset()  # a failed attempt's finish reason or usage must not leak into the next
            await asyncio.sleep(backoff)
    yield finish(map_finish_reason(state.finish), None)


def finished(
    engine: _Counts,
    request: EngineRequest,
    state: StreamState,
    reason: FinishReason,
    error: str | None,
) -> Finished:
    """The closing event: the upstream's usage, else our count (see the module docstring)."""
    prompt = state.prompt_tokens
    if prompt is None:
        prompt = engine.count_prompt_tokens(request)
    completion = state.completion_tokens
    if completion is None or reason == "error":
        completion = state.deltas
    return Finished(reason, prompt, completion, error=error)


class _Counts(Protocol):
    def count_prompt_tokens(self, request: EngineRequest) -> int: ...


def sse_events(data: bytes, state: StreamState) -> list[EngineEvent]:
    """One SSE `data` payload -> our events (usually zero or one delta)."""
    if data == b"[DONE]":
        state.done = True
        return []
    try:
        obj = json_loads(data)
    except ValueError:
        raise UpstreamBadResponse(
            f"The upstream sent an event that is not JSON: {data[:80]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise UpstreamBadResponse("The upstream sent an event that is not a JSON object.")
    if "error" in obj:
        raise stream_error(obj["error"])
    if obj.get("usage") is not None:
        state.take_usage(obj["usage"])
    events: list[EngineEvent] = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue  # we always send n=1; anything else is not ours to forward
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(delta, dict) and delta.get("tool_calls"):
            state.tool_calls.add(delta["tool_calls"])
        if isinstance(text, str) and text:
            state.deltas += 1
            events.append(TextDelta(text, logprob_entries(choice.get("logprobs"))))
        if choice.get("finish_reason"):
            state.finish = choice["finish_reason"]
            if calls := state.tool_calls.take_text():  # whole calls, in the Llama format
                state.deltas += 1
                events.append(TextDelta(calls, tool_calls=True))
    return events


def whole_answer(body: bytes, state: StreamState) -> list[EngineEvent]:
    try:
        obj = json_loads(body)
    except ValueError:
        raise UpstreamBadResponse("The upstream answered with a body that is not JSON.") from None
    if isinstance(obj, dict) and "error" in obj:
        raise stream_error(obj["error"])
    try:
        choice = obj["choices"][0]
        text = choice["message"].get("content") or ""
        calls = calls_text(choice["message"].get("tool_calls"))
    except (KeyError, IndexError, TypeError, AttributeError):
        raise UpstreamBadResponse(
            "The upstream answered with JSON that is not a completion."
        ) from None
    state.finish = choice.get("finish_reason")
    state.take_usage(obj.get("usage"))
    state.done = True
    if state.completion_tokens is None:  # no usage: the same estimate as for prompts
        state.completion_tokens = math.ceil((len(text) + len(calls)) / 4)
    events: list[EngineEvent] = []
    if text:
        events.append(TextDelta(str(text), logprob_entries(choice.get("logprobs"))))
    if calls:
        events.append(TextDelta(calls, tool_calls=True))
    state.deltas += len(events)
    return events
