"""The workbench's admin endpoints on a running gateway: auth, validate with lines, save with
optimistic concurrency, a read-only directory, dry runs (saved and draft) and evaluation."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, TEST_ADMIN_TOKEN
from tests.gateway.conftest import copy_project_policies, live_gateway, requires_redis

pytestmark = requires_redis

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
CANARY = "GATEWAY-CANARY-BLOCK"
MODEL = "meta-llama/llama-3.2-11b-vision-instruct"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project_policies(tmp_path_factory.mktemp("policies"))


@pytest.fixture(scope="module")
def server(
    gateway_settings: Any, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    state_dir = tmp_path_factory.mktemp("state")
    with live_gateway(gateway_settings, policy_dir=policy_dir, state_dir=state_dir) as live:
        yield live.base_url


def post(base: str, path: str, body: Any, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def source(base: str, name: str) -> dict[str, Any]:
    resp = httpx.get(f"{base}/admin/policies/{name}/source", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/admin/policies/overview"),
        ("GET", "/admin/policies/default/source"),
        ("POST", "/admin/policies/validate"),
        ("PUT", "/admin/policies/default"),
        ("POST", "/admin/policies/dry-run"),
        ("POST", "/admin/policies/evaluate"),
    ],
)
def test_admin_token_required(server: str, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH):
        resp = httpx.request(method, server + path, json={}, headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"


def test_overview_lists_versions_and_judged_categories(server: str) -> None:
    body = httpx.get(server + "/admin/policies/overview", headers=ADMIN).json()
    rows = {r["name"]: r for r in body["data"]}
    assert {"default", "strict", "audit"} <= set(rows)
    default = rows["default"]
    assert default["version"] == "1" and default["error"] is None
    # The guards needing weights are not configured here: no harm category is claimed.
    assert {"custom_blocklists", "profanity", "jailbreak"} <= set(default["judges"])
    assert "hate" not in default["judges"]
    assert body["writable"] is True


def test_validate_reports_lines_like_policy_check(server: str) -> None:
    text = source(server, "default")["yaml"]
    broken = text.replace("jailbreak: {threshold: medium", "jailbreak: {threshold: extreme")
    line = next(i for i, s in enumerate(broken.splitlines(), 1) if "extreme" in s)
    resp = post(server, "/admin/policies/validate", {"yaml": broken, "name": "default"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["valid"] is False
    assert body["errors"][0]["line"] == line
    assert body["errors"][0]["field"] == "categories.jailbreak.threshold"
    bad_yaml = post(server, "/admin/policies/validate", {"yaml": "name: [unclosed\n"}).json()
    assert bad_yaml["valid"] is False and bad_yaml["errors"][0]["field"] == "(yaml)"
    ok = post(server, "/admin/policies/validate", {"yaml": text}).json()
    assert ok == {"valid": True, "errors": [], "policy": {"name": "default", "version": "1"}}
    assert post(server, "/admin/policies/validate", {"yml": text}).status_code == 400


def test_dry_run_saved_policy_blocks_the_canary(server: str) -> None:
    tokens_before = _prompt_tokens(server)
    resp = post(server, "/admin/policies/dry-run", {"policy": "default", "prompt": CANARY})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["source"] == "saved" and body["policy"] == {"name": "default", "version": "1"}
    assert body["response"]["status"] == 400
    error = body["response"]["body"]["error"]
    assert error["code"] == "content_filter"
    assert error["innererror"]["content_filter_result"]["custom_blocklists"]["filtered"]
    assert body["input"]["decided_by"] == ["blocklist"]
    verdicts = {g["guard"]: g for g in body["guards"]}
    assert verdicts["blocklist"]["categories"]["blocklist:canary"]["detected"] is True
    assert verdicts["blocklist"]["latency_ms"] >= 0
    assert _prompt_tokens(server) == tokens_before  # nothing generated, nothing billed


def test_dry_run_with_answer_and_image(server: str) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = post(
        server,
        "/admin/policies/dry-run",
        {"policy": "default", "prompt": "Describe it", "image": image, "answer": "It is red."},
    ).json()
    assert body["response"]["status"] == 200
    choice = body["response"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["content_filter_results"]["profanity"] == {"filtered": False, "detected": False}
    assert body["response"]["prompt_filter_results"][0]["prompt_index"] == 0
    assert {g["stage"] for g in body["guards"]} == {"input", "output"}
    bad = post(
        server,
        "/admin/policies/dry-run",
        {"policy": "default", "prompt": "x", "image": "data:image/png;base64,AAAA"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"


def test_dry_run_draft_shows_the_difference(server: str) -> None:
    text = source(server, "default")["yaml"]
    draft = text.replace(
        "terms: [GATEWAY-CANARY-BLOCK]", "terms: [GATEWAY-CANARY-BLOCK, pineapple]"
    )
    body = post(
        server, "/admin/policies/dry-run", {"draft": draft, "prompt": "I like pineapple pizza"}
    ).json()
    assert body["source"] == "draft"
    assert body["response"]["status"] == 400
    assert body["saved"]["response"]["status"] == 200
    assert body["difference"]["status"] == {"saved": 200, "draft": 400}
    whats = {c["what"] for c in body["difference"]["changes"]}
    assert {"blocked", "blocklist:canary"} <= whats
    broken = post(server, "/admin/policies/dry-run", {"draft": "version: [", "prompt": "x"})
    assert broken.status_code == 400 and broken.json()["error"]["errors"][0]["line"] == 1
    missing = post(server, "/admin/policies/dry-run", {"policy": "nope", "prompt": "x"})
    assert missing.status_code == 404


def test_save_with_etag_then_conflict(server: str, policy_dir: Path) -> None:
    src = source(server, "strict")
    assert src["writable"] is True and src["etag"]
    text = re.sub(r'version: "?[^"\n]*"?', 'version: "41"', src["yaml"], count=1)
    saved = httpx.put(
        server + "/admin/policies/strict", json={"yaml": text, "etag": src["etag"]}, headers=ADMIN
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["version"] == "41"  # live at once, not at the next poll
    assert (policy_dir / "strict.yaml").read_text() == text
    assert not list(policy_dir.glob(".*.tmp"))
    rows = httpx.get(server + "/admin/policies", headers=ADMIN).json()["data"]
    assert next(r for r in rows if r["name"] == "strict")["version"] == "41"
    # The same (now stale) etag again: a conflict, and the file is untouched.
    stale = httpx.put(
        server + "/admin/policies/strict",
        json={"yaml": text.replace('"41"', '"42"'), "etag": src["etag"]},
        headers=ADMIN,
    )
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "policy_conflict"
    assert stale.json()["error"]["current_etag"] == saved.json()["etag"]
    assert (policy_dir / "strict.yaml").read_text() == text


def test_save_rejects_invalid_yaml_and_wrong_name(server: str, policy_dir: Path) -> None:
    src = source(server, "audit")
    before = (policy_dir / "audit.yaml").read_text()
    broken = src["yaml"] + "\nguard_timeout_s: -1\n"
    resp = httpx.put(
        server + "/admin/policies/audit", json={"yaml": broken, "etag": src["etag"]}, headers=ADMIN
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["errors"][0]["field"] == "guard_timeout_s"
    assert resp.json()["error"]["errors"][0]["line"] == len(broken.splitlines())
    renamed = src["yaml"].replace("name: audit", "name: other")
    wrong = httpx.put(
        server + "/admin/policies/audit", json={"yaml": renamed, "etag": src["etag"]}, headers=ADMIN
    )
    assert wrong.status_code == 400
    assert (policy_dir / "audit.yaml").read_text() == before


def test_evaluate_draft_against_saved(server: str) -> None:
    text = source(server, "default")["yaml"]
    draft = text.replace("terms: [GATEWAY-CANARY-BLOCK]", "terms: [GATEWAY-CANARY-BLOCK, haiku]")
    jsonl = (
        '{"text": "Write a haiku about harbours at dawn.", "expected": []}\n'
        '{"text": "GATEWAY-CANARY-BLOCK", "expected": ["blocklist:canary"]}\n'
        '{"text": "What is the capital of Australia?", "expected": []}\n'
    )
    body = post(
        server, "/admin/policies/evaluate", {"policy": "default", "draft": draft, "jsonl": jsonl}
    ).json()
    assert body["lines"] == 3
    assert body["saved"]["categories"]["blocklist:canary"]["precision"] == 1.0
    assert body["draft"]["categories"]["blocklist:canary"]["precision"] == 0.5
    assert body["draft"]["categories"]["blocklist:canary"]["fpr"] == 0.5
    assert [c["line"] for c in body["changed"]] == [1]
    shipped = post(
        server, "/admin/policies/evaluate", {"policy": "default", "dataset": "embedded.jsonl"}
    )
    assert shipped.status_code == 200 and shipped.json()["lines"] > 10
    bad = post(server, "/admin/policies/evaluate", {"policy": "default", "jsonl": "{nope\n"})
    assert bad.status_code == 400 and "line" in bad.json()["error"]["message"]


def _prompt_tokens(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    m = re.search(r"^gateway_prompt_tokens_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    copy_project_policies(source_dir)
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(source_dir), str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_read_only_directory_refuses_saves(
    gateway_settings: Any, read_only_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state_dir = tmp_path_factory.mktemp("state")
    with live_gateway(gateway_settings, policy_dir=read_only_dir, state_dir=state_dir) as live:
        overview = httpx.get(live.base_url + "/admin/policies/overview", headers=ADMIN).json()
        assert overview["writable"] is False and "read-only" in overview["read_only_reason"]
        src = source(live.base_url, "default")
        assert src["writable"] is False
        resp = httpx.put(
            live.base_url + "/admin/policies/default",
            json={"yaml": src["yaml"], "etag": src["etag"]},
            headers=ADMIN,
        )
        assert resp.status_code == 403
        error = resp.json()["error"]
        assert error["code"] == "policy_dir_read_only" and "Helm" in error["message"]
        # Drafts can still be tried.
        dry = post(live.base_url, "/admin/policies/dry-run", {"draft": src["yaml"], "prompt": "hi"})
        assert dry.status_code == 200


def test_concurrent_saves_with_one_etag_one_wins(server: str, policy_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    src = source(server, "audit")

    def save(i: int) -> int:
        text = re.sub(r'version: "?[^"\n]*"?', f'version: "c{i}"', src["yaml"], count=1)
        resp = httpx.put(
            server + "/admin/policies/audit",
            json={"yaml": text, "etag": src["etag"]},
            headers=ADMIN,
            timeout=30,
        )
        return resp.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(save, range(8)))
    assert statuses == [200] + [409] * 7
    winner = source(server, "audit")
    assert winner["version"].startswith("c")
    assert f'version: "{winner["version"]}"' in (policy_dir / "audit.yaml").read_text()


def _png_data_url(size: tuple[int, int] = (8, 8)) -> str:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", size, "red").save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def test_evaluate_upload_cannot_open_server_files(server: str, tmp_path: Path) -> None:
    import json

    outside = tmp_path / "secret.png"
    from PIL import Image

    Image.new("RGB", (4, 4), "green").save(outside)
    refs: list[Any] = [
        str(outside),  # an absolute path to a real image
        "../../pyproject.toml",  # escapes the data sets' folder
        "../guard_eval/../../../policies/default.yaml",
        "/etc/passwd",
        "no-such-file.png",
        5,  # not a string
    ]
    messages = set()
    for ref in refs:
        jsonl = (
            '{"text": "fine", "expected": []}\n'
            + json.dumps({"text": "look", "expected": [], "image": ref})
            + "\n"
        )
        resp = post(server, "/admin/policies/evaluate", {"policy": "default", "jsonl": jsonl})
        assert resp.status_code == 400, (ref, resp.text)
        error = resp.json()["error"]
        assert error["param"] == "jsonl"
        assert "line 2" in error["message"] or "line:2" in error["message"], error
        messages.add(error["message"])
    # Whether a path exists on the server is not revealed: every path gets the same answer.
    assert len([m for m in messages if "shipped" in m]) == 1
    # A data: image goes through the app's image limits (pixels here) and names its line.
    huge = json.dumps({"text": "x", "expected": [], "image": _png_data_url((8000, 8000))})
    resp = post(server, "/admin/policies/evaluate", {"policy": "default", "jsonl": huge + "\n"})
    assert resp.status_code == 400 and "line 1" in resp.json()["error"]["message"], resp.text
    broken = json.dumps({"text": "x", "expected": [], "image": "data:image/png;base64,AAAA"})
    resp = post(server, "/admin/policies/evaluate", {"policy": "default", "jsonl": broken + "\n"})
    assert resp.status_code == 400 and "line 1" in resp.json()["error"]["message"], resp.text
    ok = json.dumps({"text": "what colour", "expected": [], "image": _png_data_url()})
    resp = post(server, "/admin/policies/evaluate", {"policy": "default", "jsonl": ok + "\n"})
    assert resp.status_code == 200 and resp.json()["lines"] == 1, resp.text
    escape = post(server, "/admin/policies/evaluate", {"policy": "default", "dataset": ".."})
    assert escape.status_code == 404
