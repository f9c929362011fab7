"""Real processes for the tests that need them: a private redis-server that can be killed,
paused and restarted on its own port, and `gateway serve` replicas run as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A throwaway redis-server on a fixed loopback port, restartable on the same port, without
    persistence (a restart comes back empty)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([REDIS_SERVER, *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)


def gateway_env(model_dir: Path, redis_url: str, prefix: str, **settings: str) -> dict[str, str]:
    """The environment of a `gateway serve` replica: this process's, without its GATEWAY_*
    variables, plus the given settings (names without the GATEWAY_ prefix, any case)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_MODEL_PATH=str(model_dir),
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_REDIS_KEY_PREFIX=prefix,
        GATEWAY_DEVICE="cpu",
        GATEWAY_LOG_LEVEL="warning",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    env.update({f"GATEWAY_{name.upper()}": value for name, value in settings.items()})
    return env


class Replica:
    """One `gateway serve` subprocess on a free port. Its log goes to `log_path` (read it
    with `log()` to explain a failure)."""

    def __init__(self, env: dict[str, str], state_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / "gateway.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port)],
                env={**env, "GATEWAY_STATE_DIR": str(state_dir)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the replica exited: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica did not become ready: {self.log()[-2000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no settling; its leases stay in Redis until they expire."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_replicas(count: int, env: dict[str, str], state_root: Path) -> list[Replica]:
    """`count` replicas started together (they load in parallel), each ready on return."""
    replicas = []
    for i in range(count):
        state = state_root / f"replica-{i}"
        state.mkdir(parents=True, exist_ok=True)
        replicas.append(Replica(env, state))
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas
