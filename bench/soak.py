"""Soak: many mixed requests on the demo gateway; does anything grow?

    python bench/soak.py [--requests 20000] [--concurrency 16] [--every 2000] [--warmup 4000]

Starts `gateway serve` on the demo model (this checkout, CPU, the shipped `default` policy) with
its own Redis (`redis-server` on a random port, no persistence) and sends `--requests` mixed
requests from `--concurrency` clients: prompts of 1-1,500 characters, one in eight with a small
image, half streamed, one stream in twenty-five dropped by its client after the first chunk,
one request in fifty malformed (a 400 is the right answer). Every `--every` requests it reads
the server's resident memory (RSS), open file descriptors and threads from /proc, and the
Redis `used_memory` (sockets counted apart from other fds: they follow the requests in flight).
At the end: the growth per 1,000 requests after `--warmup` requests (a least-squares slope over
the samples from then on) and the count of answers by status (a 5xx is a failure; the run goes
on). `--requests 2000 --every 500 --warmup 500` is a quick run; SIGINT or SIGTERM stops early and
reports what was measured.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
WORDS = ("alpha", "river", "stone", "light", "green", "table", "quiet", "north", "paper", "seven")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def small_png(seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    size = (rng.randint(16, 96), rng.randint(16, 96))
    image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Request:
    body: bytes
    stream: bool
    drop: bool  # the client closes the connection after the first chunk


def make_request(rng: random.Random, images: list[str]) -> Request:
    if rng.random() < 0.02:  # malformed: a 400, never a 5xx
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user"}], "max_tokens": -3}
        return Request(json.dumps(body).encode(), False, False)
    chars = rng.randint(1, 1500)
    text = " ".join(rng.choice(WORDS) for _ in range(chars // 6 + 1))[:chars] or "hi"
    content: Any = text
    if rng.random() < 0.125:
        content = [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": rng.choice(images)}},
        ]
    stream = rng.random() < 0.5
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randint(1, 16),
        "stream": stream,
    }
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return Request(json.dumps(body).encode(), stream, stream and rng.random() < 0.08)


@dataclass
class Totals:
    statuses: Counter[str] = field(default_factory=Counter)
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def send(port: int, key: str, request: Request) -> str:
    """The outcome: the HTTP status, or `dropped`, or the client error's name."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        conn.request("POST", "/v1/chat/completions", body=request.body, headers=headers)
        resp = conn.getresponse()
        if request.drop and resp.status == 200:
            resp.readline()
            return "dropped"
        data = resp.read()
        if request.stream and resp.status == 200 and b"data: [DONE]" not in data:
            return "stream-cut"
        if resp.status >= 500:  # which failure: the envelope's code (503:redis_unavailable)
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                return f"{resp.status}:{json.loads(data)['error']['code']}"
        return str(resp.status)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def proc_numbers(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    sockets = files = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
            else:
                files += 1
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": sockets + files,
        "file_fds": files,  # not sockets: those follow the requests in flight
    }


def redis_memory_mb(port: int) -> float:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "memory"], capture_output=True, text=True, check=True
    ).stdout
    used = next(line for line in out.splitlines() if line.startswith("used_memory:"))
    return int(used.split(":")[1]) / 2**20


def slope_per_1000(xs: list[int], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def wait_ready(port: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the gateway never got ready; see {log}:\n{log.read_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--every", type=int, default=2_000, help="sample every N requests")
    parser.add_argument("--warmup", type=int, default=4_000, help="requests before the slope")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-log", type=Path, help="copy the gateway's log here at the end")
    args = parser.parse_args()
    if args.every > args.requests:
        args.every = args.requests
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_port = random.Random().randint(20_000, 60_000)
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        port, key = free_port(), "sk-soak-" + secrets.token_hex(16)
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(ROOT),
            GATEWAY_PORT=str(port),
            GATEWAY_STATE_DIR=str(work / "state"),
            GATEWAY_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            GATEWAY_BOOTSTRAP_KEY=key,
            GATEWAY_DEVICE="cpu",
            GATEWAY_LOG_LEVEL="warning",
            TOKENIZERS_PARALLELISM="false",
        )
        log = work / "gateway.log"
        server = subprocess.Popen(
            [sys.executable, "-c", "from gateway.cli import main; main()", "serve"],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        procs.append(server)
        wait_ready(port, log)

        rng = random.Random(args.seed)
        images = [small_png(i) for i in range(8)]
        plan = [make_request(rng, images) for _ in range(args.requests)]
        totals = Totals()
        samples: list[dict[str, float]] = []
        next_index = iter(range(args.requests))
        index_lock = threading.Lock()
        started = time.monotonic()

        def sample(done: int) -> None:
            row = {"requests": done, **proc_numbers(server.pid)}
            row["redis_mb"] = redis_memory_mb(redis_port)
            row["elapsed_s"] = time.monotonic() - started
            row["5xx"] = sum(n for s, n in totals.statuses.items() if s.startswith("5"))
            samples.append(row)
            print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)

        sample(0)

        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                with index_lock:
                    i = next(next_index, None)
                if i is None:
                    return
                outcome = send(port, key, plan[i])
                with totals.lock:
                    totals.statuses[outcome] += 1
                    totals.done += 1
                    due = totals.done % args.every == 0
                    done = totals.done
                if due:
                    sample(done)

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
        except KeyboardInterrupt:  # SIGINT: stop early, report what was measured
            stop.set()
            for thread in threads:
                thread.join()
            sample(totals.done)
        report(samples, totals, args, time.monotonic() - started)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep_log is not None and (work / "gateway.log").exists():
            shutil.copy(work / "gateway.log", args.keep_log)
        shutil.rmtree(work, ignore_errors=True)


def report(
    samples: list[dict[str, float]], totals: Totals, args: argparse.Namespace, elapsed: float
) -> None:
    outcomes = dict(sorted(totals.statuses.items()))
    print(f"\n{totals.done} requests in {elapsed:.0f} s ({totals.done / elapsed:.1f}/s), "
          f"concurrency {args.concurrency}; outcomes: {outcomes}")  # fmt: skip
    print("\n| requests | RSS MB | open fds (not sockets) | threads | Redis MB | 5xx so far |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in sorted(samples, key=lambda r: r["requests"]):
        print(f"| {int(row['requests']):,} | {row['rss_mb']:.1f} | {int(row['fds'])} "
              f"({int(row['file_fds'])}) | {int(row['threads'])} | {row['redis_mb']:.2f} | "
              f"{int(row['5xx'])} |")  # fmt: skip
    warm = sorted((r for r in samples if r["requests"] >= args.warmup), key=lambda r: r["requests"])
    xs = [int(r["requests"]) for r in warm]
    print(f"\ngrowth per 1,000 requests after {args.warmup:,} (least squares, {len(xs)} samples):")
    for name in ("rss_mb", "fds", "file_fds", "threads", "redis_mb"):
        print(f"  {name}: {slope_per_1000(xs, [r[name] for r in warm]):+.4f}")


if __name__ == "__main__":
    main()
