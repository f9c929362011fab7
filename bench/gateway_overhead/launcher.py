"""Start today's gateway app in front of an OpenAI-compatible upstream, for the benchmark.

`gateway serve` with a routes file (GATEWAY_ROUTES_FILE) does the same in production; the
benchmark builds `create_app(settings, engine=OpenAIUpstreamEngine(...))` itself (settings from
the usual GATEWAY_* environment) so that the "before" checkout, which predates the routes file,
runs the same way, with uvicorn as `gateway serve` runs it (uvloop, and httptools behind the
gateway's write-coalescing protocol).

    GATEWAY_MODEL_ID=bench-model GATEWAY_REDIS_URL=redis://127.0.0.1:6379/0 \
    GATEWAY_BOOTSTRAP_KEY=sk-... python bench/gateway_overhead/launcher.py \
        --upstream http://127.0.0.1:9100/v1 --port 9200
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True, help="the upstream's api_base (…/v1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument(
        "--inline-token-count",
        action="store_true",
        help="projection of the proposed chat.py change: call count_prompt_tokens inline "
        "(no asyncio.to_thread) when the engine says it is cheap",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import uvicorn

    from gateway.app import create_app
    from gateway.http_server import CoalescingHttpToolsProtocol
    from gateway.settings import Settings
    from model.upstream import OpenAIUpstreamEngine, UpstreamConfig

    if args.inline_token_count:
        inline_cheap_token_counts()
    settings = Settings(host=args.host, port=args.port)
    engine = OpenAIUpstreamEngine(
        UpstreamConfig(
            model_id=settings.model_id,
            api_base=args.upstream,
            upstream_model="mock",
            pool_size=args.pool_size,
        )
    )
    uvicorn.run(
        create_app(settings, engine=engine),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        loop="auto",
        http=CoalescingHttpToolsProtocol,
        timeout_graceful_shutdown=2,
    )


def inline_cheap_token_counts() -> None:
    """Give gateway.chat an `asyncio` whose to_thread runs cheap token counts inline: what the
    integration change does, without editing gateway/chat.py (benchmark only)."""
    import asyncio
    import types

    import gateway.chat

    async def to_thread(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(getattr(func, "__self__", None), "cheap_token_count", False):
            return func(*args, **kwargs)
        return await asyncio.to_thread(func, *args, **kwargs)

    shim = types.SimpleNamespace(**{n: getattr(asyncio, n) for n in dir(asyncio)})
    shim.to_thread = to_thread
    gateway.chat.asyncio = shim  # type: ignore[assignment]


if __name__ == "__main__":
    main()
