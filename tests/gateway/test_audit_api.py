"""The audit log through a running gateway: real chat requests, `GET /admin/audit[/summary]`
(auth, filters, pagination, content-free), and a Redis that refuses audit writes."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, TEST_ADMIN_TOKEN, LiveServer, wait_until_ready
from tests.gateway.conftest import copy_project_policies, requires_redis
from tests.gateway.processes import Server

pytestmark = requires_redis

MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
CANARY = "GATEWAY-CANARY-BLOCK"
# Annotates every answer (any letter), and keeps a 10-character content sample.
WATCH_OUTPUT = """\
name: watch-output
version: "1"
guards:
  blocklist: {stages: [input, output]}
custom_blocklists:
  - {name: letters, regexes: ['[a-z]'], stage: output, action: annotate}
audit: {include_content: true, max_chars: 10}
"""
# An output guard that always fails (no weights here), under on_error: allow.
FAILING_OUTPUT = """\
name: failing-output
version: "1"
guards:
  blocklist: {stages: [input]}
  llama_guard: {stages: [output], on_error: allow}
"""


# Nothing judges the (random) answer: a clean prompt is allowed whatever the demo model says.
INPUT_ONLY = """\
name: input-only
version: "1"
guards:
  blocklist: {stages: [input]}
custom_blocklists:
  - {name: canary, terms: [GATEWAY-CANARY-BLOCK], stage: input, action: block}
"""


def chat(
    base: str, text: str, request_id: str | None = None, auth: dict[str, str] | None = None
) -> httpx.Response:
    headers = {**(auth or AUTH), **({"x-request-id": request_id} if request_id else {})}
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def make_server(gateway_settings: Any, tmp: pytest.TempPathFactory, **update: Any) -> LiveServer:
    from gateway.app import create_app

    policies = copy_project_policies(tmp.mktemp("policies"))
    (policies / "watch-output.yaml").write_text(WATCH_OUTPUT)
    (policies / "input-only.yaml").write_text(INPUT_ONLY)
    (policies / "failing-output.yaml").write_text(FAILING_OUTPUT)
    settings = gateway_settings.model_copy(
        update={"policy_dir": policies, "state_dir": tmp.mktemp("state"), **update}
    )
    return LiveServer(create_app(settings))


@pytest.fixture(scope="module")
def server(gateway_settings: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with make_server(gateway_settings, tmp_path_factory) as live:
        wait_until_ready(live.base_url)
        yield live.base_url


def audit(base: str, **params: Any) -> httpx.Response:
    return httpx.get(base + "/admin/audit", params=params, headers=ADMIN, timeout=10)


def wait_for_entry(base: str, request_id: str, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in audit(base, limit=100).json()["data"]:
            if entry["request_id"] == request_id:
                return dict(entry)
        time.sleep(0.05)
    raise AssertionError(f"no audit entry for {request_id}")


def test_admin_token_required(server: str) -> None:
    for path in ("/admin/audit", "/admin/audit/summary"):
        assert httpx.get(server + path).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(server + path, headers=wrong).status_code == 401


def test_blocked_request_is_audited_content_free(server: str) -> None:
    resp = chat(server, f"please {CANARY} now", request_id="req-audit-blocked-1")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "content_filter"
    entry = wait_for_entry(server, "req-audit-blocked-1")
    assert entry["action"] == "blocked" and entry["stage"] == "input"
    assert entry["policy"] == "default" and entry["endpoint"] == "/v1/chat/completions"
    assert entry["categories"]["blocklist:canary"]["action"] == "block"
    assert entry["decided_by"] == ["blocklist"]
    assert entry["key_id"].startswith("key_") and entry["key_name"]
    assert "content" not in entry
    text = audit(server, limit=500).text
    assert CANARY not in text and AUTH["Authorization"].split()[1] not in text


def test_flagged_moderation_is_audited_with_its_endpoint(server: str) -> None:
    headers = {**AUTH, "x-request-id": "req-audit-moderation-1"}
    body = {"input": ["a harmless line", f"please {CANARY} now"]}
    resp = httpx.post(server + "/v1/moderations", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200
    assert [r["flagged"] for r in resp.json()["results"]] == [False, True]
    entry = wait_for_entry(server, "req-audit-moderation-1")
    assert entry["endpoint"] == "/v1/moderations" and entry["action"] == "blocked"
    assert entry["categories"]["blocklist:canary"]["action"] == "block"
    assert "content" not in entry
    # Only the flagged input left an entry.
    ids = [e["request_id"] for e in audit(server, limit=500).json()["data"]]
    assert ids.count("req-audit-moderation-1") == 1


def test_allowed_request_leaves_no_entry(server: str) -> None:
    # A key on a policy without output guards: the demo model's random answer could otherwise
    # be annotated (profanity), which is audited.
    created = httpx.post(
        server + "/admin/keys", json={"name": "clean", "policy": "input-only"}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    auth = {"Authorization": f"Bearer {created.json()['key']}"}
    resp = chat(
        server, "What is the capital of Australia?", request_id="req-audit-clean-1", auth=auth
    )
    assert resp.status_code == 200
    time.sleep(0.3)
    ids = [e["request_id"] for e in audit(server, limit=500).json()["data"]]
    assert "req-audit-clean-1" not in ids


def test_pagination_filters_and_summary(server: str) -> None:
    for i in range(5):
        assert chat(server, f"{CANARY} {i}", request_id=f"req-page-{i}").status_code == 400
    wait_for_entry(server, "req-page-4")
    ids: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "category": "blocklist:canary", "action": "blocked"}
        if cursor:
            params["cursor"] = cursor
        body = audit(server, **params).json()
        assert len(body["data"]) <= 2
        ids += [e["request_id"] for e in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    page_ids = [i for i in ids if i.startswith("req-page-")]
    assert page_ids == [f"req-page-{i}" for i in reversed(range(5))]
    assert audit(server, stage="output").json()["data"] == [] or all(
        e["stage"] == "output" for e in audit(server, stage="output").json()["data"]
    )
    assert audit(server, policy="strict").json()["data"] == []
    future = int(time.time()) + 3600
    assert audit(server, since=future).json()["data"] == []
    summary = httpx.get(server + "/admin/audit/summary", headers=ADMIN).json()
    assert summary["categories"]["blocklist:canary"] >= 5
    assert summary["actions"]["blocked"] >= 5


@pytest.mark.parametrize(
    "params,param",
    [
        ({"since": "yesterday"}, "since"),
        ({"action": "maybe"}, "action"),
        ({"stage": "middle"}, "stage"),
        ({"limit": "0"}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"since": "inf"}, "since"),
        ({"since": "1e400"}, "since"),
        ({"since": "nan"}, "since"),
        ({"since": "-5"}, "since"),
        ({"until": "1e17"}, "until"),
        ({"until": "-1e30"}, "until"),
        ({"since": "0001-01-01T00:00:00Z"}, "since"),
    ],
)
def test_bad_filters_are_400(server: str, params: dict[str, str], param: str) -> None:
    resp = audit(server, **params)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    summary = httpx.get(f"{server}/admin/audit/summary", params=params, headers=ADMIN)
    if param in ("since", "until"):
        assert summary.status_code == 400, summary.text
        assert summary.json()["error"]["param"] == param


@pytest.fixture
def refusing_redis() -> Iterator[Server]:
    s = Server()
    s.start()
    assert s.proc is not None
    os.kill(s.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    yield s
    if s.proc is not None:
        os.kill(s.proc.pid, signal.SIGCONT)
    s.kill()


def test_refusing_audit_redis_changes_no_response(
    gateway_settings: Any, tmp_path_factory: pytest.TempPathFactory, refusing_redis: Server
) -> None:
    live = make_server(gateway_settings, tmp_path_factory, audit_redis_url=refusing_redis.url)
    with live:
        wait_until_ready(live.base_url)
        blocked = chat(live.base_url, f"{CANARY}")
        assert blocked.status_code == 400
        inner = blocked.json()["error"]["innererror"]["content_filter_result"]
        assert inner["custom_blocklists"]["details"] == [{"filtered": True, "id": "canary"}]
        fine = chat(live.base_url, "Hello there")
        assert fine.status_code == 200 and fine.json()["choices"][0]["finish_reason"]
        deadline = time.monotonic() + 10
        dropped = 0.0
        while time.monotonic() < deadline and dropped < 1:
            text = httpx.get(live.base_url + "/metrics").text
            m = re.search(r'gateway_audit_dropped_total\{reason="redis_error"\} (\S+)', text)
            dropped = float(m.group(1)) if m else 0.0
            time.sleep(0.1)
        assert dropped >= 1
        # Reading the audit log from a Redis that does not answer is a clear 503.
        assert audit(live.base_url).status_code == 503


def test_streamed_answer_audited_once_with_its_sample(server: str) -> None:
    import json

    created = httpx.post(
        server + "/admin/keys", json={"name": "watcher", "policy": "watch-output"}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": 16,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "req-stream-watch"}
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert any(ch.isalpha() and ch.islower() for ch in text), "the answer had no letter to flag"
    entry = wait_for_entry(server, "req-stream-watch")
    time.sleep(0.3)
    entries = [
        e for e in audit(server, limit=500).json()["data"] if e["request_id"] == "req-stream-watch"
    ]
    assert len(entries) == 1  # re-checked as the text grew, audited once
    assert entry["stage"] == "output" and entry["action"] == "annotated"
    assert entry["key_name"] == "watcher" and entry["policy"] == "watch-output"
    assert entry["categories"]["blocklist:letters"]["action"] == "annotate"
    assert 0 < len(entry["content"]) <= 10 and entry["content"] in text
    assert key not in json.dumps(entries)


def test_streamed_answer_with_a_failing_guard_is_audited_once(server: str) -> None:
    created = httpx.post(
        server + "/admin/keys", json={"name": "failing", "policy": "failing-output"}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    headers = {"Authorization": f"Bearer {created.json()['key']}"}
    for stream in (False, True):
        request_id = f"req-failing-guard-{stream}"
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 16,
            "stream": stream,
        }
        resp = httpx.post(
            server + "/v1/chat/completions",
            json=body,
            headers={**headers, "x-request-id": request_id},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        entry = wait_for_entry(server, request_id)
        assert entry["stage"] == "output" and entry["action"] == "annotated"
        assert "llama_guard" in entry["guard_errors"], entry
        time.sleep(0.3)
        entries = [
            e for e in audit(server, limit=500).json()["data"] if e["request_id"] == request_id
        ]
        assert len(entries) == 1, entries  # the same failure at every re-check: audited once
