"""The audit log: every guard decision that blocked or annotated something, in a Redis stream.

`AuditLog.record(...)` is called on the request path and only appends an entry to a bounded
in-process queue (no I/O, no await): a background writer task drains it in batches, one
pipelined round trip per batch (`XADD ... MAXLEN ~ n` per entry, then `XTRIM MINID ~` for the
age cap). When the queue is full or Redis refuses, the entries are dropped, counted in
`gateway_audit_dropped_total{reason}` and logged; the request's outcome never depends on the
audit log.

Entries are content-free by default: time, request id, key id and name, endpoint, policy name
and version, stage, per category severity/score/action and the guards that reported it, the
outcome, guard latencies and failures. A content sample (cut to `max_chars`, anything shaped
like an API key masked) is kept only when the policy says `audit: {include_content: true}`.
Reading (`query`, `summary`) walks the stream newest first; `gateway.audit_api` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter

from gateway.redis_conn import make_client
from gateway.settings import Settings
from guards.decision import Decision
from guards.policy import Policy

log = structlog.get_logger(__name__)

# Anything shaped like an API key: the character set gateway.keys accepts (any printable ASCII).
_API_KEY_RE = re.compile(r"sk-[!-~]{8,}")
# Masked before the sample is cut (so a key at the cut is masked whole): this much past it.
_KEY_MAX_LEN = 256
# A page of `query` reads at most this many stream entries looking for matches.
_SCAN_LIMIT = 5000
_READ_CHUNK = 200
# `summary` reads at most this many entries of its window (newest first), then says truncated.
SUMMARY_MAX_ENTRIES = 20_000


# The judged text for a content sample: a string, or a zero-argument callable that builds it
# (called only when the policy keeps a sample, so that no text is built for nothing).
AuditText = str | Callable[[], str] | None


@dataclass(frozen=True)
class AuditContext:
    """Who asked, through what: captured when the request is admitted."""

    request_id: str | None
    key_id: str | None
    key_name: str | None
    endpoint: str


@dataclass(frozen=True)
class AuditFilter:
    since_ms: int | None = None
    until_ms: int | None = None
    key: str | None = None  # key id or name
    policy: str | None = None
    category: str | None = None
    action: str | None = None  # blocked | annotated
    stage: str | None = None

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if self.key is not None and self.key not in (entry.get("key_id"), entry.get("key_name")):
            return False
        if self.policy is not None and entry.get("policy") != self.policy:
            return False
        if self.category is not None and self.category not in entry.get("categories", {}):
            return False
        if self.action is not None and entry.get("action") != self.action:
            return False
        return self.stage is None or entry.get("stage") == self.stage


def should_audit(decision: Decision) -> bool:
    """Only decisions that did something: blocked, annotated, or a guard failed."""
    return bool(decision.blocked or decision.hits or decision.errors)


def audit_entry(
    decision: Decision,
    policy: Policy,
    context: AuditContext | None,
    text: AuditText = None,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The stored form of one decision (a plain dict, JSON-serialisable)."""
    categories = {
        category: {
            "severity": _severity(decision, category),
            "score": round(decision.scores.get(category, 0.0), 4),
            "action": action,
            "guards": decision.sources.get(category, []),
        }
        for category, action in decision.hits.items()
    }
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(now or time.time(), UTC).isoformat(timespec="milliseconds"),
        "request_id": context.request_id if context else None,
        "key_id": context.key_id if context else None,
        "key_name": context.key_name if context else None,
        "endpoint": context.endpoint if context else None,
        "policy": policy.name,
        "policy_version": policy.version,
        "stage": decision.stage,
        "action": "blocked" if decision.blocked else "annotated",
        "categories": categories,
        "decided_by": decision.deciders(),
        "guard_latency_ms": {g: round(s * 1000, 3) for g, s in decision.latencies.items()},
        "guard_errors": dict(decision.errors),
    }
    if policy.audit.include_content and text is not None:
        if callable(text):
            text = text()
        cap = policy.audit.max_chars
        entry["content"] = _API_KEY_RE.sub("sk-***", text[: cap + _KEY_MAX_LEN])[:cap]
    return entry


def _severity(decision: Decision, category: str) -> str | None:
    severity = decision.verdicts.severities.get(category)
    if severity is not None:
        return severity
    return None


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.written = Counter(
            "gateway_audit_written", "Audit entries written to Redis", registry=registry
        )
        self.dropped = Counter(
            "gateway_audit_dropped",
            "Audit entries lost, by reason (queue_full, redis_error)",
            ["reason"],
            registry=registry,
        )


class AuditLog:
    """One per process. `start()` the writer, `record()` per decision, `stop()` flushes."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream_key: str,
        *,
        registry: CollectorRegistry | None = None,
        max_len: int = 100_000,
        max_age_s: float = 7 * 24 * 3600,
        queue_size: int = 10_000,
        batch_size: int = 256,
        retry_pause_s: float = 0.5,
        drop_log_interval_s: float = 10.0,
        summary_max_entries: int = SUMMARY_MAX_ENTRIES,
    ) -> None:
        self.client = client
        self.stream_key = stream_key
        self.max_len = max_len
        self.max_age_s = max_age_s
        self.batch_size = batch_size
        self.retry_pause_s = retry_pause_s
        self.metrics = AuditMetrics(registry or CollectorRegistry())
        self._queue: deque[str] = deque()
        self._queue_size = queue_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Drops are all counted (the metric) but logged at most once per interval, with the
        # count since the last line: an outage must not turn every request into a log line.
        self.drop_log_interval_s = drop_log_interval_s
        self.summary_max_entries = summary_max_entries
        self._unlogged_drops: dict[str, int] = {}
        self._last_drop_log = -float("inf")
        self.owns_client = False  # a client of its own (GATEWAY_AUDIT_REDIS_URL): closed on stop

    @classmethod
    def from_settings(
        cls, settings: Settings, client: aioredis.Redis, registry: CollectorRegistry
    ) -> AuditLog | None:
        """The gateway's audit log (None when GATEWAY_AUDIT_ENABLED is false)."""
        if not settings.audit_enabled:
            return None
        own = settings.audit_redis_url is not None
        if settings.audit_redis_url is not None:
            client = make_client(settings.audit_redis_url, connect_timeout_s=1, socket_timeout_s=2)
        audit = cls(
            client,
            f"{settings.redis_key_prefix}:audit",
            registry=registry,
            max_len=settings.audit_max_entries,
            max_age_s=settings.audit_max_age_s,
            queue_size=settings.audit_queue_size,
        )
        audit.owns_client = own
        return audit

    # -- writing -----------------------------------------------------------------------------

    def record(
        self,
        decision: Decision,
        policy: Policy,
        context: AuditContext | None,
        text: AuditText = None,
    ) -> None:
        """Queue one decision (if it did something). Never raises, never waits."""
        try:
            if not should_audit(decision):
                return
            if len(self._queue) >= self._queue_size:
                self._dropped("queue_full", 1)
                return
            self._queue.append(json.dumps(audit_entry(decision, policy, context, text)))
            self._idle.clear()
            self._wake.set()
        except Exception as exc:  # the audit log must never fail a request
            self._dropped("error", 1, str(exc))

    def _dropped(self, reason: str, count: int, error: str | None = None) -> None:
        """Count lost entries; log them (with the counts since the last line) at most once per
        `drop_log_interval_s`."""
        self.metrics.dropped.labels(reason).inc(count)
        self._unlogged_drops[reason] = self._unlogged_drops.get(reason, 0) + count
        now = time.monotonic()
        if now - self._last_drop_log < self.drop_log_interval_s:
            return
        dropped, self._unlogged_drops = self._unlogged_drops, {}
        self._last_drop_log = now
        log.warning(
            "audit_dropped",
            dropped=dropped,
            interval_s=self.drop_log_interval_s,
            last_error=error,
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued (bounded by `timeout_s`), then stop the writer."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout_s)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.owns_client:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def flush(self) -> None:
        """Wait until everything queued so far was written (or dropped)."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            try:
                await self._write(batch)
                self.metrics.written.inc(len(batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._dropped("redis_error", len(batch), str(exc) or type(exc).__name__)
                # A Redis that is down refuses at once: do not retry in a tight loop (entries
                # queue meanwhile, and beyond the bound are dropped and counted).
                await asyncio.sleep(self.retry_pause_s)

    async def _write(self, batch: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for data in batch:
            pipe.xadd(self.stream_key, {"e": data}, maxlen=self.max_len, approximate=True)
        min_id = int((time.time() - self.max_age_s) * 1000)
        pipe.xtrim(self.stream_key, minid=f"{min_id}-0", approximate=True)
        await pipe.execute()

    # -- reading -----------------------------------------------------------------------------

    async def query(
        self, where: AuditFilter, *, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Matching entries newest first, and the cursor of the next page (None at the end)."""
        high = f"({cursor}" if cursor else _id_bound(where.until_ms, "+")
        low = _id_bound(where.since_ms, "-")
        out: list[dict[str, Any]] = []
        scanned = 0
        last_id: str | None = None
        while len(out) < limit and scanned < _SCAN_LIMIT:
            rows = await self.client.xrevrange(self.stream_key, high, low, count=_READ_CHUNK)
            if not rows:
                return out, None
            for raw_id, fields in rows:
                entry_id = str(raw_id)
                scanned += 1
                last_id = entry_id
                entry = decode_entry(entry_id, fields)
                if entry is not None and where.matches(entry):
                    out.append(entry)
                    if len(out) >= limit:
                        return out, entry_id
            if len(rows) < _READ_CHUNK:
                return out, None
            high = f"({last_id}"
        # Scanned enough for one page: hand back where to continue.
        return out, last_id

    async def summary(self, where: AuditFilter) -> dict[str, Any]:
        """Counts per category and per action (and per category per time bucket) in a window.

        Reads at most `summary_max_entries` entries (newest first; `truncated` says when the
        window held more) and decodes them in a worker thread, off the event loop."""
        high = _id_bound(where.until_ms, "+")
        low = _id_bound(where.since_ms, "-")
        rows: list[tuple[Any, Any]] = []
        truncated = False
        while True:
            room = self.summary_max_entries - len(rows)
            if room <= 0:
                truncated = bool(await self.client.xrevrange(self.stream_key, high, low, count=1))
                break
            want = min(1000, room)
            chunk = await self.client.xrevrange(self.stream_key, high, low, count=want) or []
            rows.extend(chunk)
            if len(chunk) < want:
                break
            high = f"({chunk[-1][0]!s}"
        summary = await asyncio.to_thread(_summarise, rows, where)
        return {**summary, "truncated": truncated}


def _summarise(rows: list[tuple[Any, Any]], where: AuditFilter) -> dict[str, Any]:
    per_category: dict[str, int] = {}
    per_action: dict[str, int] = {}
    entries: list[dict[str, Any]] = []
    for raw_id, fields in rows:
        entry = decode_entry(str(raw_id), fields)
        if entry is None or not where.matches(entry):
            continue
        entries.append(entry)
        per_action[entry["action"]] = per_action.get(entry["action"], 0) + 1
        for category in entry.get("categories", {}):
            per_category[category] = per_category.get(category, 0) + 1
    return {
        "total": len(entries),
        "categories": per_category,
        "actions": per_action,
        "buckets": _buckets(entries),
    }


def _buckets(entries: list[dict[str, Any]], count: int = 24) -> list[dict[str, Any]]:
    """Entries per category over time, in `count` equal buckets (for the workbench's chart)."""
    if not entries:
        return []
    times = [int(e["id"].split("-")[0]) for e in entries]
    start, end = min(times), max(times) + 1
    width = max(1, -(-(end - start) // count))
    buckets: list[dict[str, Any]] = [
        {"start_ms": start + i * width, "categories": {}} for i in range(count)
    ]
    for entry, t in zip(entries, times, strict=True):
        bucket = buckets[min(count - 1, (t - start) // width)]["categories"]
        for category in entry.get("categories", {}) or {"(none)": 0}:
            bucket[category] = bucket.get(category, 0) + 1
    return buckets


def _id_bound(ms: int | None, default: str) -> str:
    return default if ms is None else str(ms)


def decode_entry(entry_id: str, fields: Mapping[Any, Any] | None) -> dict[str, Any] | None:
    try:
        entry = json.loads(fields["e"]) if fields else None
    except (KeyError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    entry["id"] = entry_id
    return entry
