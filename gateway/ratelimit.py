"""Per-key admission: requests/min, tokens/min and concurrency, decided in one Redis round trip.

One Lua script (EVALSHA on the limiter's pipelined connection, `gateway.redis_scripts`; reloaded
on NOSCRIPT) purges expired state, checks all
three limits and records the admission atomically, using the Redis server's clock (`TIME`) so
replicas with skewed clocks agree. Per API key (one Cluster slot via the `{id}` hash tag):

    <p>:{id}:rq   sorted set: request id -> admission time (ms); sliding-window log
    <p>:{id}:tk   sorted set: "<request id>:<tokens>" -> admission time; token reservations
    <p>:{id}:tks  string: sum of the tokens in :tk (kept in step, so no O(n) sum per request)
    <p>:{id}:cc   sorted set: request id -> lease expiry (ms); concurrency slots

`settle` (also one round trip) replaces the reservation by the real token count and frees the
slot. A lease expires `lease_ms` (GATEWAY_CONCURRENCY_LEASE_TTL_S, 10 s) after admission unless
renewed: the process's `LeaseKeeper` renews every lease it holds every third of that, from
admission to settle, so a dead replica's slots free within one lease time. A concurrency 429's
Retry-After is the time until the oldest lease expires (rounded up to whole seconds).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
import structlog
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.keys import ApiKey
from gateway.leases import LeaseKeeper
from gateway.redis_conn import REDIS_ERRORS, RedisMetrics, key_name
from gateway.redis_scripts import ScriptRunner, load_lua_scripts
from gateway.settings import Settings

log = structlog.get_logger(__name__)

Limit = Literal["requests", "tokens", "concurrency"]
_LIMITS: tuple[Limit, ...] = ("requests", "tokens", "concurrency")


_SCRIPTS = load_lua_scripts(Path(__file__).with_name("ratelimit.lua"))


def format_duration(ms: float) -> str:
    """OpenAI's (Go's) duration format: `0s`, `120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    ms = max(0, math.ceil(ms))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


@dataclass
class Admission:
    """One admission decision and the state behind OpenAI's x-ratelimit-* headers."""

    key_id: str
    request_id: str
    admitted: bool
    limit: Limit | None = None
    retry_after: float = 0.0  # seconds; > 0 when refused
    never_fits: bool = False
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_ms: int = 0
    reset_tokens_ms: int = 0
    reserved_tokens: int = 0
    holds_slot: bool = False
    degraded: bool = False  # admitted without checks: Redis down, fail-open
    settled: bool = False

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* (a limit's headers only when it is set) and, when refused, Retry-After."""
        h: dict[str, str] = {}
        if self.rpm is not None and self.remaining_requests is not None:
            h["x-ratelimit-limit-requests"] = str(self.rpm)
            h["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            h["x-ratelimit-reset-requests"] = format_duration(self.reset_requests_ms)
        if self.tpm is not None and self.remaining_tokens is not None:
            h["x-ratelimit-limit-tokens"] = str(self.tpm)
            h["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            h["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens_ms)
        if not self.admitted:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
            h["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
            if self.never_fits:
                h["x-should-retry"] = "false"  # the OpenAI SDKs honour this
        return h

    def error(self) -> RateLimited:
        if self.never_fits:
            message = (
                f"Request too large: it reserves {self.reserved_tokens} tokens (prompt + "
                f"max_tokens) but this key allows {self.tpm} tokens per minute. "
                "Reduce max_tokens or the prompt."
            )
        elif self.limit == "requests":
            message = f"Rate limit reached: {self.rpm} requests per minute."
        elif self.limit == "tokens":
            message = (
                f"Rate limit reached: {self.tpm} tokens per minute (this request reserves "
                f"{self.reserved_tokens}; {self.remaining_tokens} remaining)."
            )
        else:
            message = f"Too many concurrent requests for this key (limit {self.max_concurrency})."
        if not self.never_fits:
            message += f" Please try again in {format_duration(self.retry_after * 1000)}."
        return RateLimited(message, error_type=self.limit, headers=self.headers())


SETTLE_DEADLINE_S = 2.0


class RateLimiter:
    """Admission control for API keys against Redis. Shared by all requests of one app."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "gw",
        window_ms: int = 60_000,
        lease_ms: int = 10_000,
        deadline_s: float = 0.2,
        failure_mode: str = "closed",
        metrics: RedisMetrics | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.window_ms = window_ms  # tests shorten it; 60 s in production
        self.lease_ms = lease_ms  # renewed every third of it while the request runs
        self.deadline_s = deadline_s
        self.fail_open = failure_mode == "open"
        self.metrics = metrics
        self._scripts = ScriptRunner(client, _SCRIPTS)
        self._last_open_log = 0.0
        self._compensating: set[asyncio.Task[None]] = set()
        self.leases = LeaseKeeper(self._renew_leases, interval_s=lease_ms / 3000)

    @classmethod
    def from_settings(
        cls, settings: Settings, client: aioredis.Redis, *, metrics: RedisMetrics | None = None
    ) -> RateLimiter:
        return cls(
            client,
            prefix=settings.redis_key_prefix,
            lease_ms=int(settings.concurrency_lease_ttl_s * 1000),
            deadline_s=settings.redis_deadline_s,
            failure_mode=settings.redis_failure_mode,
            metrics=metrics,
        )

    def _keys(self, key_id: str) -> list[str]:
        return [key_name(self.prefix, key_id, s) for s in ("rq", "tk", "tks", "cc")]

    async def admit(
        self, key: ApiKey, prompt_tokens: int, max_tokens: int, *, raise_on_reject: bool = True
    ) -> Admission:
        """Admit a request or raise `RateLimited` (429) / `ServiceUnavailable` (503, fail closed).

        Keys without limits cost no Redis call. Always pair an admitted result with `settle`.
        """
        reserve = max(0, int(prompt_tokens) + int(max_tokens))
        adm = Admission(
            key_id=key.id,
            request_id=uuid.uuid4().hex,
            admitted=True,
            rpm=key.rpm,
            tpm=key.tpm,
            max_concurrency=key.max_concurrency,
            reserved_tokens=reserve if key.tpm is not None else 0,
        )
        if key.unlimited:
            return adm
        args: list[str | int] = [
            key.rpm or 0,
            key.tpm or 0,
            key.max_concurrency or 0,
            adm.reserved_tokens,
            adm.request_id,
            self.window_ms,
            self.lease_ms,
        ]
        started = time.perf_counter()
        try:
            raw = await self._scripts.run("admit", self._keys(key.id), args, self.deadline_s)
        except REDIS_ERRORS as exc:
            if isinstance(exc, TimeoutError | RedisTimeoutError):
                self._undo_later(adm, holds_slot=key.max_concurrency is not None)
            return self._unavailable(adm, exc)
        if self.metrics is not None:
            self.metrics.admission_latency.observe(time.perf_counter() - started)
        ok, limit_index, retry_ms, rcount, tsum, rreset, treset, never = (int(v) for v in raw)
        adm.admitted = bool(ok)
        adm.reset_requests_ms, adm.reset_tokens_ms = rreset, treset
        if key.rpm is not None:
            adm.remaining_requests = max(0, key.rpm - rcount)
        if key.tpm is not None:
            adm.remaining_tokens = max(0, key.tpm - tsum)
        if ok:
            adm.holds_slot = key.max_concurrency is not None
            if adm.holds_slot:
                self.leases.hold(key.id, adm.request_id, adm)
            if self.metrics is not None:
                self.metrics.admissions.inc()
            return adm
        adm.limit = _LIMITS[limit_index - 1]
        adm.retry_after = max(retry_ms, 1) / 1000
        adm.never_fits = bool(never)
        adm.reserved_tokens = reserve
        if self.metrics is not None:
            self.metrics.rejections.labels(adm.limit).inc()
        log.debug("rate limited", key_id=key.id, limit=adm.limit, retry_after=adm.retry_after)
        if raise_on_reject:
            raise adm.error()
        return adm

    def _undo_later(self, adm: Admission, *, holds_slot: bool) -> None:
        """A late reply: the script may have run (and recorded this request) although we gave
        up on it. Settle it to nothing in the background, so no slot or reservation leaks; the
        settle script removes by request id, so it is harmless if the admission never ran."""
        ghost = replace(adm, admitted=True, holds_slot=holds_slot, settled=False)
        task = asyncio.get_running_loop().create_task(self.settle(ghost, 0))
        self._compensating.add(task)
        task.add_done_callback(self._compensating.discard)

    def _unavailable(self, adm: Admission, exc: BaseException) -> Admission:
        if self.metrics is not None:
            self.metrics.redis_errors.labels("admit").inc()
        if not self.fail_open:
            log.warning("redis unreachable; request refused", error=type(exc).__name__)
            raise ServiceUnavailable(
                "Rate limiting is unavailable: the gateway cannot reach Redis. "
                "Please try again shortly.",
                headers={"Retry-After": "1"},
            ) from exc
        if self.metrics is not None:
            self.metrics.fail_open.inc()
        now = time.monotonic()
        if now - self._last_open_log > 5:  # one line per 5 s, not one per request
            self._last_open_log = now
            log.warning(
                "redis unreachable; admitting without limits (fail-open)",
                key_id=adm.key_id,
                error=type(exc).__name__,
            )
        adm.degraded = True
        adm.rpm = adm.tpm = adm.max_concurrency = None  # no headers we cannot back
        adm.reserved_tokens = 0
        return adm

    def settle(self, admission: Admission, used_tokens: int) -> Coroutine[Any, Any, None]:
        """Settle the reservation to `used_tokens` and free the slot. Never raises.

        Call exactly once per admitted request, whatever the outcome (success, error, client
        disconnect, content filter); pass 0 when nothing was processed. The lease stops being
        renewed at once, at the call; the returned coroutine (await it, or run it as a task)
        does the Redis part.
        """
        if admission.settled or not admission.admitted:
            return _nothing()
        admission.settled = True
        self.leases.drop(admission.request_id)
        if admission.degraded or (not admission.holds_slot and not admission.reserved_tokens):
            return _nothing()
        return self._settle(admission, used_tokens)

    async def _settle(self, admission: Admission, used_tokens: int) -> None:
        args: list[str | int] = [
            admission.request_id,
            admission.reserved_tokens,
            max(0, int(used_tokens)) if admission.reserved_tokens else 0,
            self.window_ms,
        ]
        try:
            # Settling runs after the response (off the client's path): it may wait longer than
            # admission, since a settle given up on leaks its slot until the lease expires.
            await self._scripts.run(
                "settle",
                self._keys(admission.key_id),
                args,
                max(self.deadline_s, SETTLE_DEADLINE_S),
            )
        except REDIS_ERRORS as exc:
            # The lease expires by itself and the reservation leaves the window: no leak.
            if self.metrics is not None:
                self.metrics.redis_errors.labels("settle").inc()
            log.warning("settle failed", key_id=admission.key_id, error=type(exc).__name__)

    async def renew(self, admission: Admission) -> bool:
        """Renew one lease now (the keeper renews them all every lease/3); False when Redis no
        longer had it (it is back now) or the renewal failed."""
        if not admission.holds_slot or admission.settled:
            return True
        try:
            return await self._renew_leases(admission.key_id, [admission.request_id]) == 0
        except REDIS_ERRORS:
            return False

    async def _renew_leases(self, key_id: str, request_ids: list[str]) -> int:
        """Extend these leases of one API key (one script call); how many Redis had lost."""
        keys = [key_name(self.prefix, key_id, "cc")]
        try:
            lost = await self._scripts.run(
                "renew",
                keys,
                [self.lease_ms, *request_ids],
                max(self.deadline_s, SETTLE_DEADLINE_S),
            )
        except REDIS_ERRORS:
            if self.metrics is not None:
                self.metrics.redis_errors.labels("renew").inc()
            raise  # the keeper logs one line per beat, not one per API key
        return int(lost)

    async def aclose(self) -> None:
        await self.leases.aclose()
        await self._scripts.aclose()


async def _nothing() -> None:
    return None


def settle_in_background(
    pending: set[asyncio.Task[None]], limiter: RateLimiter, adm: Admission, used: int
) -> None:
    """Settle in a task of its own: it must run even when the client's task was cancelled.
    `pending` keeps a reference until it is done (the app's `Services.background`)."""
    task = asyncio.get_running_loop().create_task(limiter.settle(adm, used))
    pending.add(task)
    task.add_done_callback(pending.discard)
