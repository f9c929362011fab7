"""The audit log on a real Redis: what an entry holds (content-free by default), filters,
pagination newest first, the caps, and a Redis that refuses (nothing but a counted drop)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.audit import AuditContext, AuditFilter, AuditLog
from gateway.redis_conn import make_client
from guards.base import GuardInput
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.policy import Policy
from guards.policy_loader import parse_policy
from model.engine import ChatTurn, TextPart
from tests.gateway.conftest import requires_redis
from tests.gateway.processes import Server

pytestmark = requires_redis

SECRET_KEY = "sk-live-abcdefghijklmnop0123456789"

POLICY = """\
name: audited
version: "3"
guards:
  blocklist: {{stages: [input, output]}}
custom_blocklists:
  - name: canary
    terms: [GATEWAY-CANARY-BLOCK]
    stage: input
    action: block
  - name: watch
    terms: [harbour]
    action: annotate
{audit}
"""


def policy(audit: str = "") -> Policy:
    return parse_policy(POLICY.format(audit=audit))


async def decide(p: Policy, text: str, stage: str = "input") -> Decision:
    pipeline = GuardPipeline(p, {})
    turns = (ChatTurn("user", (TextPart(text),)),)
    if stage == "output":
        item = GuardInput("output", turns, completion=text)
    else:
        item = GuardInput("input", turns)
    (decision,) = await pipeline.run(item.stage, [item])
    return decision


def ctx(key: str = "key_a", request_id: str = "req_1") -> AuditContext:
    return AuditContext(request_id, key, f"name-{key}", "/v1/chat/completions")


@pytest_asyncio.fixture
async def audit(client: aioredis.Redis, prefix: str) -> AsyncIterator[AuditLog]:
    log = AuditLog(client, f"{prefix}:audit")
    log.start()
    yield log
    await log.stop()


async def test_entry_is_content_free_by_default(audit: AuditLog, client: aioredis.Redis) -> None:
    p = policy()
    text = f"GATEWAY-CANARY-BLOCK my key is {SECRET_KEY} near the harbour"
    decision = await decide(p, text)
    assert decision.blocked
    audit.record(decision, p, ctx())
    audit.record(decision, p, ctx(), text)  # the text is offered, the policy says no
    await audit.flush()
    raw = await client.xrange(audit.stream_key)
    assert len(raw) == 2
    for _, fields in raw:
        assert "CANARY" not in fields["e"] and "harbour" not in fields["e"]
        assert SECRET_KEY not in fields["e"]
    entries, cursor = await audit.query(AuditFilter())
    assert cursor is None
    entry = entries[0]
    assert "content" not in entry
    assert entry["request_id"] == "req_1" and entry["key_id"] == "key_a"
    assert entry["key_name"] == "name-key_a" and entry["endpoint"] == "/v1/chat/completions"
    assert (entry["policy"], entry["policy_version"], entry["stage"]) == ("audited", "3", "input")
    assert entry["action"] == "blocked"
    assert entry["decided_by"] == ["blocklist"]
    canary = entry["categories"]["blocklist:canary"]
    assert canary["action"] == "block" and canary["score"] == 1.0
    assert entry["categories"]["blocklist:watch"]["action"] == "annotate"
    assert set(entry["guard_latency_ms"]) == {"blocklist"}


async def test_content_sample_only_when_the_policy_asks(
    audit: AuditLog, client: aioredis.Redis
) -> None:
    p = policy("audit: {include_content: true, max_chars: 60}")
    text = f"the harbour, my key {SECRET_KEY}, and then a great deal more text after that"
    decision = await decide(p, text)
    assert not decision.blocked and decision.hits == {"blocklist:watch": "annotate"}
    audit.record(decision, p, ctx(), text)
    await audit.flush()
    (entry,), _ = await audit.query(AuditFilter())
    assert entry["action"] == "annotated"
    assert entry["content"].startswith("the harbour, my key sk-***")
    assert SECRET_KEY not in json.dumps(entry)
    assert len(entry["content"]) <= 60


async def test_allowed_decisions_are_not_logged(audit: AuditLog, client: aioredis.Redis) -> None:
    p = policy()
    decision = await decide(p, "a quiet question")
    audit.record(decision, p, ctx())
    await audit.flush()
    assert await client.exists(audit.stream_key) == 0


async def test_filters_and_pagination_newest_first(audit: AuditLog) -> None:
    p = policy()
    blocked = await decide(p, "GATEWAY-CANARY-BLOCK")
    annotated = await decide(p, "harbour", stage="output")
    for i in range(7):
        audit.record(blocked if i % 2 == 0 else annotated, p, ctx(f"key_{i % 3}", f"req_{i}"))
    await audit.flush()
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = await audit.query(AuditFilter(), cursor=cursor, limit=3)
        pages += 1
        seen += [e["request_id"] for e in page]
        if cursor is None:
            break
    assert seen == [f"req_{i}" for i in reversed(range(7))]
    assert pages == 3
    only = await audit.query(AuditFilter(action="blocked"), limit=50)
    assert [e["request_id"] for e in only[0]] == ["req_6", "req_4", "req_2", "req_0"]
    out = await audit.query(AuditFilter(stage="output", category="blocklist:watch"))
    assert [e["request_id"] for e in out[0]] == ["req_5", "req_3", "req_1"]
    by_key = await audit.query(AuditFilter(key="name-key_0"))
    assert [e["request_id"] for e in by_key[0]] == ["req_6", "req_3", "req_0"]
    assert (await audit.query(AuditFilter(policy="other")))[0] == []
    newest = int(seen and (await audit.query(AuditFilter(), limit=1))[0][0]["id"].split("-")[0])
    assert (await audit.query(AuditFilter(since_ms=newest + 1)))[0] == []
    summary = await audit.summary(AuditFilter())
    assert summary["total"] == 7
    assert summary["actions"] == {"blocked": 4, "annotated": 3}
    assert summary["categories"] == {"blocklist:canary": 4, "blocklist:watch": 3}
    assert sum(sum(b["categories"].values()) for b in summary["buckets"]) == 7


async def test_length_cap(client: aioredis.Redis, prefix: str) -> None:
    log = AuditLog(client, f"{prefix}:audit", max_len=100, batch_size=50)
    log.start()
    p = policy()
    decision = await decide(p, "GATEWAY-CANARY-BLOCK")
    for _ in range(1000):
        log.record(decision, p, ctx())
    await log.stop()
    # Trimmed with MAXLEN ~ (whole stream nodes of 100 entries at a time).
    assert 100 <= await client.xlen(log.stream_key) <= 200


@pytest.fixture
def private_redis() -> Iterator[Server]:
    s = Server()
    s.start()
    yield s
    if s.proc is not None:
        os.kill(s.proc.pid, signal.SIGCONT)
    s.kill()


@pytest.mark.parametrize("how", ["paused", "stopped"])
async def test_a_refusing_redis_is_counted_not_raised(private_redis: Server, how: str) -> None:
    client = make_client(private_redis.url, connect_timeout_s=0.2, socket_timeout_s=0.2)
    log = AuditLog(client, "audit-test:audit")
    log.start()
    p = policy()
    decision = await decide(p, "GATEWAY-CANARY-BLOCK")
    assert private_redis.proc is not None
    if how == "paused":
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # accepts TCP, never answers
    else:
        private_redis.kill()
    for _ in range(5):
        log.record(decision, p, ctx())  # never raises, never waits
    await log.flush()
    assert log.metrics.dropped.labels("redis_error")._value.get() == 5
    assert log.metrics.written._value.get() == 0
    await log.stop()
    await client.aclose()


async def test_cli_tail_and_follow(
    audit: AuditLog, client: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import subprocess
    import sys

    from typer.testing import CliRunner

    from gateway.cli import cli
    from tests.gateway.conftest import REDIS_URL

    p = policy()
    blocked = await decide(p, "GATEWAY-CANARY-BLOCK")
    annotated = await decide(p, "harbour")
    for i in range(4):
        audit.record(blocked if i < 3 else annotated, p, ctx(request_id=f"req_{i}"))
    await audit.flush()
    env = {"GATEWAY_REDIS_URL": REDIS_URL, "GATEWAY_REDIS_KEY_PREFIX": prefix}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = ["audit", "tail", "--limit", "2", "--action", "blocked", "--json"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["request_id"] for e in lines] == ["req_1", "req_2"]  # the last two, oldest first
    text = await asyncio.to_thread(CliRunner().invoke, cli, ["audit", "tail"])
    assert "req=req_3" in text.stdout and "blocklist:watch" in text.stdout
    bad = await asyncio.to_thread(CliRunner().invoke, cli, ["audit", "tail", "--since", "x"])
    assert bad.exit_code == 2

    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "audit",
            "tail",
            "--follow",
            "--json",
            "--limit",
            "1",
            "--stage",
            "input",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, **env},
        text=True,
    )
    try:
        assert follow.stdout is not None
        first = await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 60)
        assert json.loads(first)["request_id"] == "req_3"
        audit.record(blocked, p, ctx(request_id="req_new"))
        await audit.flush()
        line = await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 30)
        assert json.loads(line)["request_id"] == "req_new"
    finally:
        follow.kill()
        follow.wait(10)


async def test_a_full_queue_drops_and_counts(client: aioredis.Redis, prefix: str) -> None:
    log = AuditLog(client, f"{prefix}:audit", queue_size=3)
    p = policy()
    decision = await decide(p, "GATEWAY-CANARY-BLOCK")
    for _ in range(5):  # the writer is not started: nothing drains the queue
        log.record(decision, p, ctx())
    assert log.metrics.dropped.labels("queue_full")._value.get() == 2
    log.start()
    await log.stop()
    assert await client.xlen(log.stream_key) == 3
    assert log.metrics.written._value.get() == 3


async def test_content_sample_masks_keys_of_any_printable_characters(
    audit: AuditLog, client: aioredis.Redis
) -> None:
    p = policy("audit: {include_content: true, max_chars: 40}")
    odd_key = "sk-Ab!c$d%e&f*g+h=i~j#k@l^m|n.o,p?q"
    text = f"the harbour {odd_key} then the key cut by the cap: {SECRET_KEY}"
    decision = await decide(p, text)
    audit.record(decision, p, ctx(), text)
    await audit.flush()
    (entry,), _ = await audit.query(AuditFilter())
    assert entry["content"].startswith("the harbour sk-*** then"), entry["content"]
    stored = json.dumps(entry)
    for leaked in ("Ab!c", "q?p", "p?q", SECRET_KEY[3:10]):
        assert leaked not in stored


async def test_drops_are_all_counted_but_logged_once_per_interval(
    client: aioredis.Redis, prefix: str
) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry
    from structlog.testing import capture_logs

    registry = CollectorRegistry()
    # No writer started and room for one entry: every later record is a queue_full drop.
    log = AuditLog(
        client, f"{prefix}:audit", registry=registry, queue_size=1, drop_log_interval_s=0.3
    )
    p = policy()
    decision = await decide(p, "GATEWAY-CANARY-BLOCK")
    with capture_logs() as logs:
        for _ in range(200):
            log.record(decision, p, ctx())
        await asyncio.sleep(0.35)
        log.record(decision, p, ctx())
        log.record(decision, p, ctx())
    dropped = registry.get_sample_value("gateway_audit_dropped_total", {"reason": "queue_full"})
    assert dropped == 201
    lines = [e for e in logs if e["event"] == "audit_dropped"]
    assert [e["dropped"] for e in lines] == [{"queue_full": 1}, {"queue_full": 199}], lines


async def test_summary_reads_at_most_its_cap_and_says_truncated(
    client: aioredis.Redis, prefix: str
) -> None:
    log = AuditLog(client, f"{prefix}:audit", summary_max_entries=25)
    log.start()
    try:
        p = policy()
        blocked = await decide(p, "GATEWAY-CANARY-BLOCK")
        annotated = await decide(p, "the harbour")
        for i in range(30):
            log.record(blocked if i % 3 else annotated, p, ctx())
        await log.flush()
        capped = await log.summary(AuditFilter())
        assert capped["total"] == 25 and capped["truncated"] is True
        log.summary_max_entries = 1000
        full = await log.summary(AuditFilter())
        assert full["total"] == 30 and full["truncated"] is False
        assert full["actions"] == {"blocked": 20, "annotated": 10}
        assert full["categories"]["blocklist:canary"] == 20
        assert sum(sum(b["categories"].values()) for b in full["buckets"]) >= 30
        only = await log.summary(AuditFilter(action="annotated"))
        assert only["total"] == 10 and only["actions"] == {"annotated": 10}
    finally:
        await log.stop()


async def test_text_is_built_only_when_the_policy_keeps_a_sample(audit: AuditLog) -> None:
    built: list[str] = []

    def text() -> str:
        built.append("built")
        return "the harbour at dawn"

    content_free = policy()
    decision = await decide(content_free, "the harbour")
    audit.record(decision, content_free, ctx(request_id="req_free"), text)
    keeps = policy("audit: {include_content: true, max_chars: 60}")
    decision = await decide(keeps, "the harbour")
    audit.record(decision, keeps, ctx(request_id="req_keeps"), text)
    await audit.flush()
    assert built == ["built"]  # only for the policy that keeps a sample
    entries, _ = await audit.query(AuditFilter())
    by_id = {e["request_id"]: e for e in entries}
    assert "content" not in by_id["req_free"]
    assert by_id["req_keeps"]["content"] == "the harbour at dawn"
