"""Streaming moderation cost: an answer streamed through the output guards vs the same answer
checked whole (non-streamed), through an upstream route to an echo engine.

    python bench/stream_moderation.py [--before REV|DIR] [--sizes 4000 16000 64000] [--repeats 5]

The echo engine answers with the user's text: streamed in `--chunk` (7) character deltas, one
write each, as an engine writes tokens; or whole. The gateway (this checkout's `create_app` with
an `OpenAIUpstreamEngine`, run by uvicorn as `gateway serve` runs it) applies the shipped
`default` policy (blocklist and profanity on the output; the text is clean prose, so nothing is
blocked, and the bench checks that every answer arrives whole). Per size, `--repeats` rounds
(median reported), each round one non-streamed and one streamed request per target, targets
interleaved so that drift on a shared machine hits them alike. Targets: this checkout; with
`--before`, another checkout (a directory, or a git revision exported with `git archive`) run the
same way in the same run; and this checkout with a policy that runs no guards (the floor).

Needs Redis on 127.0.0.1:6379 (`--redis-url`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "bench-model"
OFF_POLICY = 'name: "off"\nversion: "1"\nguards: {}\non_guard_error: allow\n'
_PHRASE = (
    "the quick brown fox jumps over a lazy dog while river stones gather moss under bright "
    "summer light and careful readers note every small detail of the old map before walking "
    "home through quiet streets where bakers open early"
)
WORDS = _PHRASE.split(" ")


def prose(chars: int, seed: int = 0) -> str:
    """Clean sentences of 6-16 words, `chars` characters in all."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        out.append(sentence.capitalize() + (".\n" if rng.random() < 0.1 else ". "))
        size += len(out[-1])
    return "".join(out)[:chars]


# -- the echo engine (a child process) ---------------------------------------------------------
def echo_app(chunk_chars: int) -> Any:
    def sse(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({"id": "echo", "object": "chat.completion.chunk", "choices": [choice]})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        raw = b""
        more = True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        body = json.loads(raw)
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content)
        tokens = max(1, len(text) // 4)
        usage = {"prompt_tokens": tokens, "completion_tokens": tokens, "total_tokens": 2 * tokens}
        if not body.get("stream"):
            message = {"role": "assistant", "content": text}
            answer = {
                "id": "echo",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        parts = [chunk({"role": "assistant", "content": ""})]
        parts += [
            chunk({"content": text[i : i + chunk_chars]}) for i in range(0, len(text), chunk_chars)
        ]
        parts.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            parts.append(sse({"id": "echo", "choices": [], "usage": usage}))
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def serve_echo(port: int, chunk_chars: int) -> None:
    import uvicorn

    uvicorn.run(echo_app(chunk_chars), host="127.0.0.1", port=port, log_level="warning")


# -- a gateway from a given checkout (a child process) -----------------------------------------
def serve_gateway(root: Path, upstream: str, port: int) -> None:
    sys.path.insert(0, str(root))
    os.chdir(root)
    import uvicorn

    from gateway.app import create_app
    from gateway.http_server import CoalescingHttpToolsProtocol
    from gateway.settings import Settings
    from model.upstream import OpenAIUpstreamEngine, UpstreamConfig

    settings = Settings(host="127.0.0.1", port=port)
    engine = OpenAIUpstreamEngine(
        UpstreamConfig(model_id=settings.model_id, api_base=upstream, upstream_model="echo")
    )
    app = create_app(settings, engine=engine)
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                http=CoalescingHttpToolsProtocol)  # fmt: skip


# -- the parent ---------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    root: Path
    policy: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    conn: http.client.HTTPConnection | None = None
    times: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[int, bool], list[float]] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """The gateway's CPU time, all its threads (schedstat: nanoseconds, where /proc's stat
        counts 10 ms ticks)."""
        assert self.proc is not None
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(port: int, path: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never answered {path}; see {log}:\n{log.read_text()[-2000:]}")


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def request(t: Target, key: str, text: str, stream: bool) -> float:
    """Seconds until the whole answer arrived; checks that it is the text, unfiltered."""
    # A new connection each time: a slow target leaves the others idle past uvicorn's
    # keep-alive timeout.
    t.conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=600)
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream}
    body["max_tokens"] = len(text)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    t.conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
    resp = t.conn.getresponse()
    raw = resp.read()
    elapsed = time.perf_counter() - started
    t.conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{t.name}: HTTP {resp.status}: {raw[:300]!r}")
    if stream:
        got, finish = "", None
        for line in raw.split(b"\n\n"):
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                got += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    else:
        answer = json.loads(raw)["choices"][0]
        got, finish = answer["message"]["content"], answer["finish_reason"]
    if got != text or finish != "stop":
        raise RuntimeError(f"{t.name}: the answer came back changed (finish {finish})")
    return elapsed


def export(rev: str, into: Path) -> Path:
    """A checkout of `rev` (or the directory itself)."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a checkout directory or a git revision to compare")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000, 64000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=7, help="characters per streamed delta")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-floor", action="store_true", help="skip the no-guards target")
    sub = parser.add_subparsers(dest="child")
    echo = sub.add_parser("echo")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--chunk", type=int, default=7)
    serve = sub.add_parser("serve")
    serve.add_argument("--root", type=Path, required=True)
    serve.add_argument("--upstream", required=True)
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.child == "echo":
        return serve_echo(args.port, args.chunk)
    if args.child == "serve":
        return serve_gateway(args.root, args.upstream, args.port)

    work = Path(tempfile.mkdtemp(prefix="stream-moderation-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        policies = work / "policies"
        policies.mkdir()
        shutil.copy(ROOT / "policies" / "default.yaml", policies / "default.yaml")
        (policies / "off.yaml").write_text(OFF_POLICY)
        targets = [Target("after", ROOT, "default")]
        if args.before:
            targets.append(Target("before", export(args.before, work / "before"), "default"))
        if not args.no_floor:
            targets.append(Target("no guards", ROOT, "off"))
        echo_port = free_port()
        log = work / "echo.log"
        procs.append(spawn(["echo", "--port", str(echo_port), "--chunk", str(args.chunk)],
                           dict(os.environ), log))  # fmt: skip
        wait_http(echo_port, "/health", log)
        key = "sk-bench-" + secrets.token_hex(16)
        for t in targets:
            t.port = free_port()
            env = dict(os.environ)
            env.update(
                PYTHONPATH=str(t.root),
                GATEWAY_MODEL_ID=MODEL,
                GATEWAY_REDIS_URL=args.redis_url,
                GATEWAY_REDIS_KEY_PREFIX="bench-sm-" + secrets.token_hex(4),
                GATEWAY_BOOTSTRAP_KEY=key,
                GATEWAY_POLICY_DIR=str(policies),
                GATEWAY_DEFAULT_POLICY=t.policy,
                GATEWAY_LOG_LEVEL="warning",
                TOKENIZERS_PARALLELISM="false",
            )
            log = work / f"{t.name.replace(' ', '-')}.log"
            upstream = f"http://127.0.0.1:{echo_port}/v1"
            t.proc = spawn(["serve", "--root", str(t.root), "--upstream", upstream,
                            "--port", str(t.port)], env, log)  # fmt: skip
            procs.append(t.proc)
            wait_http(t.port, "/healthz", log)
        for t in targets:  # warm-up: imports, pools, the classifier's first call
            for stream in (False, True):
                request(t, key, prose(500, seed=1), stream)
        for size in args.sizes:
            text = prose(size)
            for _ in range(args.repeats):
                for t in targets:
                    for stream in (False, True):
                        cpu = t.cpu_seconds()
                        elapsed = request(t, key, text, stream)
                        t.cpu.setdefault((size, stream), []).append(t.cpu_seconds() - cpu)
                        t.times.setdefault((size, stream), []).append(elapsed)
            print(f"{size} chars done", file=sys.stderr, flush=True)
        report(targets, args.sizes)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def report(targets: list[Target], sizes: list[int]) -> None:
    def ms(t: Target, size: int, stream: bool, cpu: bool = False) -> float:
        return statistics.median((t.cpu if cpu else t.times)[(size, stream)]) * 1000

    after = next(t for t in targets if t.name == "after")
    for cpu in (False, True):
        what = "gateway CPU ms per request" if cpu else "wall ms per request"
        print(f"\n{what} (median of {len(after.times[(sizes[0], True)])})\n")
        header = "| chars |"
        for t in targets:
            header += f" {t.name}: non-stream | {t.name}: stream |"
        print(header + " after: stream / non-stream |")
        print("| ---: |" + " ---: | ---: |" * len(targets) + " ---: |")
        for size in sizes:
            row = f"| {size:,} |"
            for t in targets:
                row += f" {ms(t, size, False, cpu):.1f} | {ms(t, size, True, cpu):.1f} |"
            ratio = ms(after, size, True, cpu) / ms(after, size, False, cpu)
            print(row + f" {ratio:.2f} |")


if __name__ == "__main__":
    main()
