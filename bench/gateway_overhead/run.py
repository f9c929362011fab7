"""Gateway overhead in one run: a zero-delay mock upstream, reached directly, through the gateway
and through LiteLLM Proxy (the anchor), on this machine.

    python bench/gateway_overhead/run.py [--litellm-venv /tmp/litellm-proxy-venv] [--profile]
    python bench/gateway_overhead/run.py --before DIR [--before-without hiredis]  # a change

`--before DIR` also measures the guards-off gateway from another checkout (`git archive REV |
tar -x -C DIR`) in the same run, so a change and its baseline see the same machine.

Needs: Redis on 127.0.0.1:6379 (admission runs: the bootstrap key gets an rpm and tpm limit),
`wrk` on PATH, and LiteLLM Proxy in its own venv (`python -m venv V && V/bin/pip install
'litellm[proxy]'`; skipped with a note when absent). Guards: off (a policy that runs none);
`--with-default-policy` adds the shipped `default` policy (the embedded guards);
`--with-audit` adds that policy with every request annotated, with the audit log on and off.

Per target: 300 sequential non-streaming requests (latency p50/p99), 100 sequential streams
(time to the first chunk with content), then `wrk` with 32 connections for 10 s (requests/s)
while the server's CPU time is read from /proc/<pid>/stat (utime+stime, its children
included) to give CPU ms per request (`--wrk-rounds N`: N runs per target, interleaved, the
median reported). Sequential requests are interleaved across targets so
that drift on a shared machine hits all of them alike. "Added" = target percentile minus the
direct percentile. The client is `http.client` on one keep-alive connection per target.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL = "bench-model"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello in a few words."}],
    "max_tokens": 16,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    name: str
    port: int
    key: str
    proc: subprocess.Popen[bytes] | None = None
    latencies: list[float] = field(default_factory=list)
    first_chunk: list[float] = field(default_factory=list)
    first_content: list[float] = field(default_factory=list)
    wrk: dict[str, Any] = field(default_factory=dict)
    conn: http.client.HTTPConnection | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers


# -- processes --------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def wait_http(port: int, path: str, headers: dict[str, str], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path, headers=headers)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never answered {path}; see {log}:\n{log.read_text()[-2000:]}")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants (LiteLLM may fork a worker)."""
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    kids = [p for p in descendants(proc.pid) if p != proc.pid]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in kids:  # only the children of the processes this script started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the client -------------------------------------------------------------------------------
def connection(t: Target) -> http.client.HTTPConnection:
    if t.conn is None:
        t.conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=30)
    return t.conn


def one_request(t: Target, body: bytes) -> float:
    conn = connection(t)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers=t.headers())
    resp = conn.getresponse()
    data = resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise RuntimeError(f"{t.name}: HTTP {resp.status}: {data[:300]!r}")
    return elapsed


def one_stream(t: Target, body: bytes) -> tuple[float, float]:
    """(time to the first SSE chunk, time to the first chunk with content)."""
    conn = connection(t)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers=t.headers())
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{t.name}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = content = None
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter() - started
        first = now if first is None else first
        if content is None and re.search(rb'"content":"[^"]', line):
            content = now
        if line.startswith(b"data: [DONE]"):
            break
    resp.read()
    if first is None or content is None:
        raise RuntimeError(f"{t.name}: the stream had no content")
    return first, content


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def run_wrk(t: Target, seconds: int, conns: int, body: str) -> dict[str, Any]:
    env = {**os.environ, "BENCH_BODY": body, "BENCH_KEY": t.key}
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(HERE / "post.lua")]
    cpu0 = cpu_seconds(t.proc.pid) if t.proc else 0.0
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{t.port}"], env=env, capture_output=True, text=True, check=True
    ).stdout
    cpu1 = cpu_seconds(t.proc.pid) if t.proc else 0.0
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": requests,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "cpu_ms_per_request": (cpu1 - cpu0) * 1000 / max(requests, 1),
        "p50": re.search(r"50%\s+(\S+)", out).group(1),  # type: ignore[union-attr]
        "p99": re.search(r"99%\s+(\S+)", out).group(1),  # type: ignore[union-attr]
    }


# -- the targets ------------------------------------------------------------------------------
def start_all(args: argparse.Namespace, work: Path) -> tuple[Target, list[Target]]:
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    mock_port = free_port()
    mock = Target("direct (mock)", mock_port, "")
    mock.proc = spawn(
        [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)],
        base_env,
        work / "mock.log",
    )
    wait_http(mock_port, "/health", {}, 30, work / "mock.log")
    upstream = f"http://127.0.0.1:{mock_port}/v1"
    targets = [mock]

    policies = work / "policies"
    policies.mkdir()
    # "Guards off": a valid policy that runs no guard (and never blocks).
    (policies / "off.yaml").write_text(
        'name: "off"\nversion: "1"\nguards: {}\non_guard_error: allow\n'
    )
    variants = [
        (
            "gateway (guards off)",
            {"GATEWAY_POLICY_DIR": str(policies), "GATEWAY_DEFAULT_POLICY": "off"},
        )
    ]
    if args.with_projection:
        variants.append(
            (
                "gateway (guards off, inline count)",
                {**variants[0][1], "INLINE_TOKEN_COUNT": "1"},
            )
        )
    if args.before:
        # The same gateway from another checkout (e.g. `git archive <rev> | tar -x -C DIR`):
        # baseline and change measured in one run, requests interleaved.
        variants.insert(0, ("gateway before (guards off)", {**variants[0][1], "BEFORE": "1"}))
    if args.with_default_policy:
        variants.append(("gateway (default policy)", {"GATEWAY_DEFAULT_POLICY": "default"}))
        if args.before:
            variants.append(
                (
                    "gateway before (default policy)",
                    {"GATEWAY_DEFAULT_POLICY": "default", "BEFORE": "1"},
                )
            )
    if args.with_audit:
        # Worst case for the audit log: every request is annotated (a blocklist term in the
        # benchmark prompt), so every request writes an entry; the same with the log off.
        default = (ROOT / "policies" / "default.yaml").read_text()
        annotating = default.replace("name: default", "name: annotate-all", 1).replace(
            "custom_blocklists:\n",
            "custom_blocklists:\n"
            "  - {name: watch, terms: [hello], stage: input, action: annotate}\n",
            1,
        )
        (policies / "annotate-all.yaml").write_text(annotating)
        for log_on in ("true", "false"):
            label = "on" if log_on == "true" else "off"
            variants.append(
                (
                    f"gateway (annotating policy, audit {label})",
                    {
                        "GATEWAY_POLICY_DIR": str(policies),
                        "GATEWAY_DEFAULT_POLICY": "annotate-all",
                        "GATEWAY_AUDIT_ENABLED": log_on,
                    },
                )
            )
    for name, extra in variants:
        key = "sk-bench-" + secrets.token_hex(16)
        gw = Target(name, free_port(), key)
        gw_env = {
            **base_env,
            **extra,
            "GATEWAY_MODEL_ID": MODEL,
            "GATEWAY_REDIS_URL": args.redis_url,
            "GATEWAY_REDIS_KEY_PREFIX": "bench-" + secrets.token_hex(4),
            "GATEWAY_BOOTSTRAP_KEY": key,
            # Limits that never bite but make admission run its Redis script on every request.
            "GATEWAY_DEFAULT_RPM": "100000000",
            "GATEWAY_DEFAULT_TPM": "10000000000",
            "GATEWAY_STATE_DIR": str(work / "state"),
            "GATEWAY_LOG_LEVEL": "warning",
        }
        log = work / f"gateway-{len(targets)}.log"
        tree = ROOT
        if extra.pop("BEFORE", None):
            tree = args.before.resolve()
            paths = [str(tree)]  # its packages, not this checkout's
            if args.before_without:
                # Optional modules it did not depend on (redis-py uses hiredis when present).
                blocked = work / "blocked-modules"
                blocked.mkdir(exist_ok=True)
                for module in args.before_without.split(","):
                    (blocked / f"{module}.py").write_text(f"raise ImportError('{module}')\n")
                paths.insert(0, str(blocked))
            if os.environ.get("PYTHONPATH"):
                paths.append(os.environ["PYTHONPATH"])
            gw_env["PYTHONPATH"] = os.pathsep.join(paths)
            gw_env.pop("BEFORE", None)
        launcher = [sys.executable, str(tree / "bench/gateway_overhead/launcher.py")]
        launcher += ["--upstream", upstream]
        if extra.get("INLINE_TOKEN_COUNT"):
            launcher.append("--inline-token-count")
        gw.proc = spawn([*launcher, "--port", str(gw.port)], gw_env, log, cwd=tree)
        wait_http(gw.port, "/v1/models", gw.headers(), 120, log)
        targets.append(gw)

    litellm_bin = Path(args.litellm_venv) / "bin" / "litellm"
    if litellm_bin.exists():
        master = "sk-litellm-" + secrets.token_hex(16)
        lt = Target("LiteLLM Proxy", free_port(), master)
        config = work / "litellm.yaml"
        config.write_text(
            json.dumps(
                {
                    "model_list": [
                        {
                            "model_name": MODEL,
                            "litellm_params": {
                                "model": "openai/mock",
                                "api_base": upstream,
                                "api_key": "sk-mock",
                            },
                        }
                    ],
                    "general_settings": {"master_key": master},
                }
            )
        )
        lt_env = {
            **base_env,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_MASTER_KEY": master,
        }
        cmd = [str(litellm_bin), "--config", str(config), "--host", "127.0.0.1"]
        lt.proc = spawn(
            [*cmd, "--port", str(lt.port), "--num_workers", "1"],
            lt_env,
            work / "litellm.log",
        )
        wait_http(lt.port, "/health/liveliness", {}, 180, work / "litellm.log")
        targets.append(lt)
    else:
        print(f"note: no LiteLLM Proxy at {litellm_bin}: anchor skipped", file=sys.stderr)
    return mock, targets


# Where a sampled stack belongs, first match wins (a frame name or file fragment -> a label).
UPSTREAM = "upstream call (HTTP client, SSE parsing, body)"
CATEGORIES = [
    ("RequestResponseCycle.send", "uvicorn: writing responses to the socket"),
    ("OpenAIUpstreamEngine", UPSTREAM),
    ("model/http1", UPSTREAM),
    ("openai_wire", UPSTREAM),
    ("aiohttp", UPSTREAM),
    ("RateLimiter", "Redis: admission + settle"),
    ("ScriptRunner", "Redis: admission + settle"),
    ("redis", "Redis: admission + settle"),
    ("AuthService", "auth (key cache, HMAC)"),
    ("ChatService.prepare", "chat prepare (pydantic parse, checks, token count)"),
    ("GuardPipeline", "guards pipeline"),
    ("ChatService.complete", "chat complete (response dict)"),
    ("json/encoder", "response JSON"),
    ("ChatCompletions", "chat endpoint (raw ASGI: headers, body, response, settle task)"),
    ("chat_completions", "chat endpoint (FastAPI route)"),
    ("RequestContextMiddleware", "request context middleware (request id, metrics, log)"),
    ("starlette", "FastAPI/Starlette middleware, routing, responses"),
    ("fastapi", "FastAPI/Starlette middleware, routing, responses"),
    ("uvicorn", "uvicorn HTTP server"),
]


def profile(gw: Target, seconds: int, conns: int, body: str, work: Path) -> list[str]:
    """py-spy (--gil: only the thread holding the GIL, i.e. Python CPU) on the gateway during a
    wrk run: the share of samples per part of the request path, and the top own frames."""
    if shutil.which("py-spy") is None or gw.proc is None:
        return ["(py-spy not installed)"]
    raw = work / "gateway.pyspy.txt"
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(gw.proc.pid), "--duration", str(seconds), "--gil",
         "--rate", "250", "--format", "raw", "--output", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    run_wrk(gw, seconds - 1, conns, body)
    spy.wait(60)
    return summarize(raw, gw.name)


def summarize(raw: Path, name: str) -> list[str]:
    """A py-spy raw file: the share of samples per part of the request path, top own frames."""
    own: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        n = int(count)
        samples += n
        own[frames[-1]] += n
        label = next((lab for key, lab in CATEGORIES if key in stack), "event loop and other")
        parts[label] += n
    lines = [f"py-spy --gil: {samples} samples of {name} under wrk"]
    lines += [f"{100 * n / samples:5.1f}%  {label}" for label, n in parts.most_common()]
    lines += ["top own frames:"]
    lines += [f"{100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(12)]
    return lines


def versions(targets: list[Target], args: argparse.Namespace) -> list[str]:
    def v(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "-"

    out = [
        f"python {platform.python_version()}, uvicorn {v('uvicorn')}, uvloop {v('uvloop')}, "
        f"httptools {v('httptools')}, httpx {v('httpx')}, fastapi {v('fastapi')}, "
        f"starlette {v('starlette')}, redis-py {v('redis')}, hiredis {v('hiredis')}, "
        f"orjson {v('orjson')}",
    ]
    lite = Path(args.litellm_venv) / "bin" / "python"
    if lite.exists():
        lv = subprocess.run(
            [str(lite), "-c", "from importlib.metadata import version; print(version('litellm'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        out.append(f"LiteLLM Proxy {lv} (one worker)")
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    out.append((wrk_v.stdout + wrk_v.stderr).splitlines()[0])
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    out.append(f"{os.cpu_count()} CPUs ({cpu}), shared with other work")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--wrk-rounds", type=int, default=1, help="wrk runs per target, interleaved; the median"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--litellm-venv", default="/tmp/litellm-proxy-venv")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway under wrk")
    parser.add_argument(
        "--with-projection",
        action="store_true",
        help="also measure the guards-off gateway with token counting inline (the proposed "
        "chat.py change, patched in by the launcher)",
    )
    parser.add_argument(
        "--with-default-policy",
        action="store_true",
        help="also measure a gateway with the shipped default policy (embedded guards on); "
        "with --before, the --before checkout's too",
    )
    parser.add_argument(
        "--with-audit",
        action="store_true",
        help="also measure the default policy's guards with every request annotated, with the "
        "audit log on and off (every request then writes an audit entry)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="also measure the guards-off gateway from this checkout (the baseline of a change)",
    )
    parser.add_argument(
        "--before-without",
        metavar="MODULES",
        help="comma-separated modules the --before gateway must not import (e.g. hiredis, "
        "when the change added it as a dependency)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")

    work = Path(tempfile.mkdtemp(prefix="gw-overhead-"))
    targets: list[Target] = []
    try:
        mock, targets = start_all(args, work)
        plain = json.dumps(BODY).encode()
        streaming = json.dumps({**BODY, "stream": True}).encode()
        for _ in range(args.warmup):
            for t in targets:
                one_request(t, plain)
                one_stream(t, streaming)
        for _ in range(args.requests):
            for t in targets:
                t.latencies.append(one_request(t, plain))
        for _ in range(args.streams):
            for t in targets:
                first, content = one_stream(t, streaming)
                t.first_chunk.append(first)
                t.first_content.append(content)
        rounds: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for _ in range(args.wrk_rounds):  # interleaved, so drift hits every target alike
            for t in targets:
                result = run_wrk(t, args.wrk_seconds, args.connections, plain.decode())
                rounds[t.name].append(result)
        for t in targets:
            t.wrk = median_round(rounds[t.name])
        profiled = next(t for t in targets if t.name == "gateway (guards off)")
        profile_lines = (
            profile(profiled, args.wrk_seconds, args.connections, plain.decode(), work)
            if args.profile
            else []
        )
        report(mock, targets, args, profile_lines)
        if args.json:
            args.json.write_text(json.dumps([_raw(t) for t in targets], indent=1))
    finally:
        for t in reversed(targets):
            stop(t.proc)
        print(f"(logs in {work})", file=sys.stderr)


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s (its CPU per request with it); non-2xx summed."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    out = dict(ordered[len(ordered) // 2])
    out["non_2xx"] = sum(r["non_2xx"] for r in runs)
    out["rps_all"] = [round(r["rps"]) for r in runs]
    out["cpu_all"] = [round(r["cpu_ms_per_request"], 2) for r in runs]
    return out


def _raw(t: Target) -> dict[str, Any]:
    return {"name": t.name, "latencies": t.latencies, "first_content": t.first_content, **t.wrk}


def report(
    mock: Target, targets: list[Target], args: argparse.Namespace, profile_lines: list[str]
) -> None:
    base = {q: pct(mock.latencies, q) for q in (0.5, 0.99)}
    base_ttft = {q: pct(mock.first_content, q) for q in (0.5, 0.99)}
    print("\n" + "\n".join(f"- {line}" for line in versions(targets, args)))
    print(
        f"\n{args.requests} sequential requests, {args.streams} sequential streams, "
        f"wrk {args.connections} connections x {args.wrk_seconds} s; times in ms.\n"
    )
    print(
        "| path | p50 | p99 | added p50 | added p99 | first content p50 | added p50 | added p99 "
        "| req/s @32 | server CPU ms/req | non-2xx |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in targets:
        p50, p99 = pct(t.latencies, 0.5), pct(t.latencies, 0.99)
        f50, f99 = pct(t.first_content, 0.5), pct(t.first_content, 0.99)
        direct = t is mock
        print(
            f"| {t.name} | {p50:.2f} | {p99:.2f} | "
            + ("-" if direct else f"+{p50 - base[0.5]:.2f}")
            + " | "
            + ("-" if direct else f"+{p99 - base[0.99]:.2f}")
            + f" | {f50:.2f} | "
            + ("-" if direct else f"+{f50 - base_ttft[0.5]:.2f}")
            + " | "
            + ("-" if direct else f"+{f99 - base_ttft[0.99]:.2f}")
            + f" | {t.wrk['rps']:.0f} | {t.wrk['cpu_ms_per_request']:.2f} | {t.wrk['non_2xx']} |"
        )
    if args.wrk_rounds > 1:
        print("\nwrk rounds (req/s; CPU ms/req), median reported above:")
        for t in targets:
            print(f"- {t.name}: {t.wrk['rps_all']}; {t.wrk['cpu_all']}")
    spread = statistics.pstdev(x * 1000 for x in mock.latencies)
    print(f"\n(direct latency stdev {spread:.2f} ms; mock CPU counted only on its own row)")
    if profile_lines:
        print("\n```\n" + "\n".join(profile_lines) + "\n```")


if __name__ == "__main__":
    main()
