"""A Redis that comes back empty: the bootstrap key returns without a restart, /readyz says when
it cannot, and operators re-import known keys (admin API, CLI). Real gateways, real Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.keys_cli import app as keys_app
from gateway.redis_conn import make_client
from gateway.settings import Settings
from tests.conftest import (
    AUTH,
    REDIS_URL,
    TEST_ADMIN_TOKEN,
    TEST_API_KEY,
    LiveServer,
    wait_until_ready,
)
from tests.gateway.conftest import SECRET, requires_redis, store_for
from tests.gateway.processes import REDIS_SERVER, Server

pytestmark = requires_redis

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
CHAT = {
    "model": "meta-llama/llama-3.2-11b-vision-instruct",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 2,
}


def forget_all(r: redis.Redis, prefix: str) -> None:
    """What a Redis restarted without persistence looks like to this gateway: its keys gone
    (only this test's prefix: the Redis is shared)."""
    for name in r.scan_iter(match=f"{prefix}:*"):
        r.delete(name)


@pytest.fixture(scope="module")
def gateway(gateway_settings: Settings) -> Iterator[tuple[str, str]]:
    prefix = f"gwtest-{secrets.token_hex(4)}"
    # 16 concurrent clients on 2 shared cores delay the event loop past the production
    # deadlines (0.1-0.2 s), which would turn into 503s; these tests are about the keys.
    slack = {f"redis_{n}_s": 2.0 for n in ("deadline", "socket_timeout", "connect_timeout")}
    settings = gateway_settings.model_copy(update={"redis_key_prefix": prefix, **slack})
    try:
        with LiveServer(create_app(settings)) as server:
            wait_until_ready(server.base_url)
            yield server.base_url, prefix
    finally:
        forget_all(redis.Redis.from_url(REDIS_URL), prefix)


def test_bootstrap_key_comes_back_after_redis_lost_it(gateway: tuple[str, str]) -> None:
    base, prefix = gateway
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    records = f"{prefix}:{{keys}}:records"
    assert httpx.get(base + "/v1/models", headers=AUTH).status_code == 200
    forget_all(r, prefix)
    # Past the lookup cache and the last registration (1 s each): nothing restores the key
    # by itself (no Redis write per request, nor per second)...
    httpx.get(base + "/healthz")
    time.sleep(1.2)
    assert not r.exists(records)
    # ...until a request with it comes: 16 at once, all served, one record registered.
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.get(base + "/v1/models", headers=AUTH, timeout=30).status_code,
                range(16),
            )
        )
    assert codes == [200] * 16
    assert r.hlen(records) == 1
    chat = httpx.post(base + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=60)
    assert chat.status_code == 200, chat.text
    ready = httpx.get(base + "/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["bootstrap_key"] is True


def test_revoked_bootstrap_key_stays_revoked_until_imported(gateway: tuple[str, str]) -> None:
    base = gateway[0]
    listed = httpx.get(base + "/admin/keys", headers=ADMIN).json()["data"]
    (bootstrap,) = [k for k in listed if k["name"] == "bootstrap"]
    assert httpx.delete(base + f"/admin/keys/{bootstrap['id']}", headers=ADMIN).status_code == 204
    time.sleep(1.2)  # the lookup cache and the last restore's result
    for _ in range(3):  # revoked on purpose: not restored, by requests or by readyz
        assert httpx.get(base + "/v1/models", headers=AUTH).status_code == 401
        assert httpx.get(base + "/readyz").status_code == 200
    # The operator re-imports it from their records.
    body = {"name": "bootstrap", "key": TEST_API_KEY, "rpm": 1000}
    made = httpx.post(base + "/admin/keys", json=body, headers=ADMIN)
    assert made.status_code == 201, made.text
    assert made.json()["key"] == TEST_API_KEY and made.json()["rpm"] == 1000
    assert httpx.get(base + "/v1/models", headers=AUTH).status_code == 200
    # Again: 409 naming the existing id (so re-running an import is safe), key never echoed.
    again = httpx.post(base + "/admin/keys", json=body, headers=ADMIN)
    assert again.status_code == 409
    err = again.json()["error"]
    assert err["code"] == "key_exists" and err["param"] == "key"
    assert made.json()["id"] in err["message"] and TEST_API_KEY not in again.text
    for bad in ("sk-short", "pk-" + "x" * 30, "sk-with space-0123456789", 12345):
        refused = httpx.post(base + "/admin/keys", json={**body, "key": bad}, headers=ADMIN)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "key"
        assert str(bad) not in refused.json()["error"]["message"]


@pytest.fixture
def private_redis() -> Iterator[Server]:
    if not REDIS_SERVER:
        pytest.skip("needs redis-server")
    s = Server()
    s.start()
    yield s
    s.kill()


def test_readyz_fails_while_the_bootstrap_key_cannot_be_registered(
    gateway_settings: Settings, private_redis: Server
) -> None:
    settings = gateway_settings.model_copy(update={"redis_url": private_redis.url})
    r = redis.Redis(port=private_redis.port, decode_responses=True)
    with LiveServer(create_app(settings)) as server:
        wait_until_ready(server.base_url)
        r.flushall()  # the data is lost...
        r.config_set("maxmemory", "1")  # ...and Redis is full: the key cannot be written back
        ready = httpx.get(server.base_url + "/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["checks"]["redis"] is True and body["checks"]["bootstrap_key"] is False
        assert "GATEWAY_BOOTSTRAP_KEY" in body["reason"] and "OutOfMemory" in body["reason"]
        assert TEST_API_KEY not in ready.text
        # Requests with the key get 503 (Redis cannot serve), not a misleading 401.
        time.sleep(1.1)
        assert httpx.get(server.base_url + "/v1/models", headers=AUTH).status_code == 503
        r.config_set("maxmemory", "0")
        assert httpx.get(server.base_url + "/readyz").status_code == 200  # registered it
        assert httpx.get(server.base_url + "/v1/models", headers=AUTH).status_code == 200


def test_cli_imports_a_known_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"gwtest-{secrets.token_hex(6)}"
    monkeypatch.setenv("GATEWAY_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("GATEWAY_REDIS_KEY_PREFIX", prefix)
    monkeypatch.setenv("GATEWAY_KEY_SECRET", SECRET.decode())
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path))
    plain = "sk-restored-" + secrets.token_urlsafe(24)
    runner = CliRunner()

    async def lookup(key: str) -> tuple[str | None, int | None]:
        c = make_client(REDIS_URL, connect_timeout_s=2, socket_timeout_s=5)
        found = await store_for(c, prefix).lookup(key)  # the server's view
        await c.aclose()
        return (found.id, found.rpm) if found else (None, None)

    try:
        made = runner.invoke(keys_app, ["create", "--name", "alice", "--key", plain, "--rpm", "7"])
        assert made.exit_code == 0, made.output
        key_id = made.stdout.strip()
        assert key_id.startswith("key_") and plain not in made.output
        assert asyncio.run(lookup(plain)) == (key_id, 7)
        again = runner.invoke(keys_app, ["create", "--name", "alice", "--key", plain])
        assert again.exit_code == 1 and key_id in again.output and "already exists" in again.output
        assert plain not in again.output
        bad = runner.invoke(keys_app, ["create", "--name", "x", "--key", "sk-too-short"])
        assert bad.exit_code != 0 and "sk-too-short" not in bad.output
        assert "20 to 256 characters" in bad.output
        # Revoked, then imported again from stdin (out of the shell history and `ps`).
        assert runner.invoke(keys_app, ["revoke", key_id]).exit_code == 0
        assert asyncio.run(lookup(plain)) == (None, None)
        back = runner.invoke(keys_app, ["create", "--name", "alice", "--key", "-"], input=plain)
        assert back.exit_code == 0, back.output
        assert asyncio.run(lookup(plain))[0] == back.stdout.strip() != key_id
    finally:
        forget_all(redis.Redis.from_url(REDIS_URL), prefix)
