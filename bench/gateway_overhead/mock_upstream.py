"""A zero-delay mock OpenAI upstream: raw ASGI on uvicorn (uvloop + httptools when installed).

POST /v1/chat/completions answers at once: with `stream: true` an SSE stream of a role chunk,
DELTAS content chunks (one ASGI send each, as a real engine writes tokens), a finish chunk, the
usage chunk when asked, and [DONE]; otherwise one JSON completion. Everything is pre-encoded so
the mock's own cost stays small and constant. GET /health answers 200.

    python bench/gateway_overhead/mock_upstream.py --port 9100
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

DELTAS = ["Hello", " from", " the", " zero", "-delay", " mock", " up", "stream"]
USAGE = {"prompt_tokens": 12, "completion_tokens": len(DELTAS), "total_tokens": 12 + len(DELTAS)}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


STREAM = [_chunk({"role": "assistant", "content": ""})]
STREAM += [_chunk({"content": d}) for d in DELTAS]
STREAM += [_chunk({}, "stop")]
USAGE_CHUNK = (
    b"data: "
    + json.dumps(
        {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "choices": [], "usage": USAGE},
        separators=(",", ":"),
    ).encode()
    + b"\n\n"
)
DONE = b"data: [DONE]\n\n"
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(DELTAS)},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    },
    separators=(",", ":"),
).encode()
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    raw = b""
    more = True
    while more:
        message = await receive()
        raw += message.get("body", b"")
        more = message.get("more_body", False)
    body = json.loads(raw)
    if not body.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": COMPLETION})
        return
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    for chunk in STREAM:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if (body.get("stream_options") or {}).get("include_usage"):
        await send({"type": "http.response.body", "body": USAGE_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": DONE})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
