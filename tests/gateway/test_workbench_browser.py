"""The workbench page driven in a real browser (Debian's chromium through Playwright): sign in,
open a policy, an error at its line, a dry run, a saved draft that blocks real traffic within
5 s and shows up in the audit view, and a stale save shown as a conflict.

Screenshots of each step go to $GATEWAY_TEST_ARTIFACTS/workbench (default: a temp dir).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, TEST_ADMIN_TOKEN
from tests.gateway.conftest import copy_project_policies, live_gateway, requires_redis

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    requires_redis,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
MODEL = "meta-llama/llama-3.2-11b-vision-instruct"
NEW_TERM = "forbidden-pineapple"


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


@pytest.fixture(scope="module")
def shots() -> Path:
    root = Path(os.environ.get("GATEWAY_TEST_ARTIFACTS") or tempfile.gettempdir())
    out = root / "workbench-screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def page(server: str) -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.problems = []  # console errors, CSP violations, failed requests to elsewhere
        page.on("console", lambda m: _console(page, m))
        page.on(
            "request",
            lambda r: None if r.url.startswith(server) else page.problems.append(r.url),
        )
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def _console(page: Any, message: Any) -> None:
    # 4xx answers the page expects (a wrong token, a conflict) are logged by the browser too.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        page.problems.append(message.text)


def chat(base: str, text: str, request_id: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    headers = {**AUTH, "x-request-id": request_id}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_policy_editor_journey(server: str, page: Any, shots: Path) -> None:
    expect = playwright_api.expect
    page.goto(server + "/workbench")
    # 1. sign in (a wrong token first)
    page.fill("#token", "not-the-token")
    page.click("#signin-btn")
    expect(page.locator("#signin-error")).to_contain_text("Wrong admin token")
    page.fill("#token", TEST_ADMIN_TOKEN)
    page.click("#signin-btn")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#policies-table")).to_contain_text("default")
    assert TEST_ADMIN_TOKEN not in page.url
    page.screenshot(path=str(shots / "1-signed-in.png"))

    # 2. open default
    page.click("#policies-table button[data-name=default]")
    expect(page.locator("#editor")).to_have_value(re.compile("name: default"))
    expect(page.locator("#edit-version")).to_contain_text("version 1")
    page.screenshot(path=str(shots / "2-open-default.png"))

    # 3. break a threshold: the error at its line
    original = page.input_value("#editor")
    broken = original.replace("jailbreak: {threshold: medium", "jailbreak: {threshold: extreme")
    line = next(i for i, s in enumerate(broken.splitlines(), 1) if "extreme" in s)
    page.fill("#editor", broken)
    page.click("#validate-btn")
    expect(page.locator(f"#gutter span.err[data-line='{line}']")).to_be_visible()
    expect(page.locator("#edit-errors")).to_contain_text(
        f"line {line}: categories.jailbreak.threshold"
    )
    assert page.locator("#gutter span.err").count() == 1
    page.screenshot(path=str(shots / "3-error-at-line.png"))

    # 4. dry-run the canary on the saved policy: blocked, the guard named
    page.click("#edit-load")
    expect(page.locator("#editor")).to_have_value(original)
    page.click("nav button[data-tab=try]")
    page.select_option("#try-source", "saved:default")
    page.fill("#try-prompt", "please GATEWAY-CANARY-BLOCK")
    page.click("#try-btn")
    expect(page.locator("#try-outcome")).to_contain_text(
        "Blocked (400 content_filter) by blocklist"
    )
    expect(page.locator("#try-guards")).to_contain_text("blocklist:canary")
    page.screenshot(path=str(shots / "4-dry-run-canary.png"))

    # 5. save a draft that adds a blocklist term: real traffic blocked within 5 s, audited
    assert chat(server, f"I like {NEW_TERM}", "req-before-save").status_code == 200
    page.click("nav button[data-tab=edit]")
    draft = original.replace(
        "terms: [GATEWAY-CANARY-BLOCK]", f"terms: [GATEWAY-CANARY-BLOCK, {NEW_TERM}]"
    ).replace('version: "1"', 'version: "2"')
    page.fill("#editor", draft)
    page.click("#save-btn")
    expect(page.locator("#edit-status")).to_contain_text("Saved: version 2 is live")
    saved_at = time.monotonic()
    status = 0
    while time.monotonic() - saved_at < 5:
        status = chat(server, f"I like {NEW_TERM}", "req-after-save").status_code
        if status == 400:
            break
        time.sleep(0.1)
    assert status == 400, "the saved draft did not block within 5 s"
    page.screenshot(path=str(shots / "5-saved.png"))
    page.click("nav button[data-tab=audit]")
    page.fill("#audit-category", "blocklist:canary")
    page.click("#audit-refresh")
    expect(page.locator("#audit-table")).to_contain_text("req-after-save")
    expect(page.locator("#audit-chart rect").first).to_be_visible()
    assert "req-before-save" not in page.inner_text("#audit-table")
    page.screenshot(path=str(shots / "6-audit.png"))

    # 6. a stale save: someone else saves first; ours is a conflict, shown
    page.click("nav button[data-tab=edit]")
    src = httpx.get(server + "/admin/policies/default/source", headers=ADMIN).json()
    other = src["yaml"].replace('version: "2"', 'version: "3"')
    assert (
        httpx.put(
            server + "/admin/policies/default",
            json={"yaml": other, "etag": src["etag"]},
            headers=ADMIN,
        ).status_code
        == 200
    )
    page.fill("#editor", draft.replace('version: "2"', 'version: "4"'))
    page.click("#save-btn")
    expect(page.locator("#edit-status")).to_contain_text("Conflict")
    assert (
        'version: "3"'
        in httpx.get(server + "/admin/policies/default/source", headers=ADMIN).json()["yaml"]
    )
    page.screenshot(path=str(shots / "7-conflict.png"))

    assert page.problems == [], page.problems  # nothing from elsewhere, no CSP violation


def test_token_stays_in_the_tab(server: str, page: Any) -> None:
    page.goto(server + "/workbench")
    page.fill("#token", TEST_ADMIN_TOKEN)
    page.click("#signin-btn")
    playwright_api.expect(page.locator("#app")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 1
    assert page.evaluate("localStorage.length") == 0
    assert "token" not in page.evaluate("document.cookie")
    page.reload()  # same tab: still signed in
    playwright_api.expect(page.locator("#app")).to_be_visible()
    page.click("#signout")
    playwright_api.expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_try_and_evaluate_a_draft(server: str, page: Any, shots: Path, tmp_path: Path) -> None:
    expect = playwright_api.expect
    page.goto(server + "/workbench")
    page.fill("#token", TEST_ADMIN_TOKEN)
    page.click("#signin-btn")
    page.click("#policies-table button[data-name=strict]")
    expect(page.locator("#editor")).to_have_value(re.compile("name: strict"))
    draft = page.input_value("#editor").replace(
        "terms: [GATEWAY-CANARY-BLOCK]", "terms: [GATEWAY-CANARY-BLOCK, haiku]"
    )
    assert "haiku" in draft
    page.fill("#editor", draft)
    # Try: the unsaved draft against the saved version.
    page.click("nav button[data-tab=try]")
    page.select_option("#try-source", "draft")
    page.fill("#try-prompt", "Write a haiku about harbours")
    page.click("#try-btn")
    expect(page.locator("#try-outcome")).to_contain_text("Blocked")
    expect(page.locator("#try-diff")).to_contain_text("Saved policy answers 200, the draft 400")
    page.screenshot(path=str(shots / "8-try-draft.png"))
    # Evaluate: an uploaded labelled JSONL, draft vs saved.
    data = tmp_path / "labelled.jsonl"
    data.write_text(
        '{"text": "Write a haiku about harbours at dawn.", "expected": []}\n'
        '{"text": "GATEWAY-CANARY-BLOCK", "expected": ["blocklist:canary"]}\n'
    )
    page.click("nav button[data-tab=evaluate]")
    page.set_input_files("#eval-file", str(data))
    page.click("#eval-btn")
    expect(page.locator("#eval-status")).to_contain_text("2 lines")
    canary_row = page.locator("#eval-table tr", has_text="blocklist:canary")
    expect(canary_row).to_contain_text("1.00")  # saved precision
    expect(canary_row).to_contain_text("0.50")  # draft precision
    expect(page.locator("#eval-changed")).to_contain_text("line 1:")
    page.screenshot(path=str(shots / "9-evaluate.png"))
    assert page.problems == [], page.problems
