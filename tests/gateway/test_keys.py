"""API keys against the real Redis at 127.0.0.1:6379 (random key prefix per test), and the CLI."""

from __future__ import annotations

import asyncio
import secrets
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog
from typer.testing import CliRunner

from gateway.auth import AuthService, demo_key
from gateway.configured_keys import ConfiguredKeys
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.key_secret import load_key_secret
from gateway.keys import KeyStore, LimitDefaults
from gateway.keys_cli import app as keys_app
from gateway.model_router import ModelRouter
from gateway.redis_conn import make_client
from gateway.settings import Settings
from model.upstream import OpenAIUpstreamEngine, UpstreamConfig
from tests.gateway.conftest import REDIS_URL, SECRET, requires_redis, store_for

pytestmark = requires_redis


async def _dump(client: aioredis.Redis) -> str:
    """Every key name and value in the database, whatever the type, as one string."""
    parts: list[str] = []
    async for k in client.scan_iter(count=1000):
        kind = await client.type(k)
        value: object
        if kind == "hash":
            value = await client.hgetall(k)
        elif kind == "zset":
            value = await client.zrange(k, 0, -1, withscores=True)
        elif kind == "set":
            value = await client.smembers(k)
        elif kind == "list":
            value = await client.lrange(k, 0, -1)
        elif kind == "string":
            value = await client.get(k)
        else:
            value = kind
        parts.append(f"{k}={value!r}")
    return "\n".join(parts)


async def test_create_lookup_and_hash_only_storage(client: aioredis.Redis, store: KeyStore) -> None:
    with structlog.testing.capture_logs() as logs:
        key, plain, created = await store.create("alice", rpm=10, tpm=1000, models=["m1"])
        assert created and plain.startswith("sk-") and len(plain) >= 3 + 43
        assert key.id.startswith("key_") and key.rpm == 10 and key.models == ("m1",)
        found = await store.lookup(plain)
        assert found == key
        assert await store.lookup(plain + "x") is None
        auth = AuthService(store)
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"Bearer {plain}x")
    assert plain not in repr(logs)  # logs name the key id only
    dump = await _dump(client)
    assert key.key_hash in dump and key.id in dump
    assert plain not in dump and plain[3:] not in dump  # never the plain key, in any form
    assert store.hash_key(plain) == key.key_hash
    assert key.public()["hint"] == f"sk-...{plain[-4:]}"
    assert "key_hash" not in key.public()


async def test_revocation_and_patch_seen_by_other_replica(
    client: aioredis.Redis, prefix: str
) -> None:
    other_client = make_client(REDIS_URL, connect_timeout_s=2, socket_timeout_s=5)
    a, b = store_for(client, prefix), store_for(other_client, prefix)
    key, plain, _ = await a.create("bob", rpm=5)
    assert (await b.lookup(plain)) is not None  # now cached in replica b

    await a.update(key.id, rpm=7, disabled=True)
    t0 = time.monotonic()
    while (seen := await b.lookup(plain)) is not None and seen.rpm != 7:
        await asyncio.sleep(0.05)
    assert seen is not None and seen.disabled and time.monotonic() - t0 <= 2.0

    assert await a.delete(key.id)
    t0 = time.monotonic()
    while await b.lookup(plain) is not None:
        await asyncio.sleep(0.05)
    assert time.monotonic() - t0 <= 2.0
    assert not await a.delete(key.id)
    assert await a.get(key.id) is None
    await other_client.aclose()


async def test_auth_rules(store: KeyStore) -> None:
    settings = Settings()
    # The served model's names come from the router; its engine is never started here.
    router = ModelRouter.from_settings(
        settings, lambda s: OpenAIUpstreamEngine(UpstreamConfig(s.model_id, "http://127.0.0.1:9"))
    )
    auth = AuthService.from_settings(store, settings, router)
    canonical = settings.model_id
    # The allow-list may use the Hugging Face spelling (an alias) of the served model.
    key, plain, _ = await store.create(
        "carol", models=["meta-llama/Llama-3.2-11B-Vision-Instruct", "future/model"]
    )
    assert (await auth.authenticate(f"Bearer {plain}", canonical)).id == key.id
    assert (await auth.authenticate(f"bearer  {plain} ", "future/model")).id == key.id
    with pytest.raises(PermissionDenied) as denied:
        await auth.authenticate(f"Bearer {plain}", "other/model")
    assert denied.value.param == "model" and denied.value.status_code == 403
    assert denied.value.code == "model_not_allowed"

    for header in (None, "", "Bearer ", "Basic abc", plain):
        with pytest.raises(AuthenticationFailed) as missing:
            await auth.authenticate(header, canonical)
        assert missing.value.code == "invalid_api_key" and missing.value.status_code == 401
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        await auth.authenticate("Bearer sk-unknown-key-0000000000000000", canonical)

    await store.update(key.id, disabled=True)
    with pytest.raises(AuthenticationFailed, match="disabled"):
        await auth.authenticate(f"Bearer {plain}", canonical)
    await store.update(key.id, disabled=False, expires_at=datetime.now(UTC) - timedelta(1))
    with pytest.raises(AuthenticationFailed, match="expired"):
        await auth.authenticate(f"Bearer {plain}", canonical)
    soon = datetime.now(UTC) + timedelta(hours=1)
    await store.update(key.id, expires_at=soon, models=[])
    ok = await auth.authenticate(f"Bearer {plain}", "any/model")  # empty list: all models
    assert ok.models is None and ok.expires_at is not None


async def test_patch_fields(client: aioredis.Redis, prefix: str) -> None:
    store = store_for(client, prefix, defaults=LimitDefaults(rpm=60, tpm=None))
    key, _, _ = await store.create("dave")
    assert (key.rpm, key.tpm, key.max_concurrency) == (60, None, None)  # settings defaults
    unlimited, _, _ = await store.create("erin", rpm=None)
    assert unlimited.unlimited
    new = await store.update(key.id, rpm=None, tpm=500, max_concurrency=2, policy="strict")
    assert new is not None and new == await store.get(key.id)
    assert (new.rpm, new.tpm, new.max_concurrency, new.policy) == (None, 500, 2, "strict")
    assert await store.update("key_missing", rpm=1) is None
    with pytest.raises(ValueError):
        await store.update(key.id, key_hash="x")
    # Concurrent PATCHes of different fields all land (compare-and-set, no lost update).
    await asyncio.gather(*(store.update(key.id, **{f: 3}) for f in ("rpm", "tpm")))
    final = await store.get(key.id)
    assert final is not None and (final.rpm, final.tpm, final.max_concurrency) == (3, 3, 2)
    assert [k.id for k in await store.list()] == [key.id, unlimited.id]


async def test_defaults_from_settings_or_env(
    client: aioredis.Redis, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_DEFAULT_TPM", "9000")
    monkeypatch.setenv("GATEWAY_REDIS_KEY_PREFIX", prefix)
    settings = Settings(state_dir=tmp_path, key_secret=None, default_rpm=30)
    store = KeyStore.from_settings(settings, client)
    assert store.prefix == prefix and store.cache_ttl_s <= 1.0
    key, _, _ = await store.create("frank")
    assert (key.rpm, key.tpm, key.max_concurrency) == (30, 9000, None)


async def test_bootstrap_idempotent(client: aioredis.Redis, prefix: str) -> None:
    plain = "sk-bootstrap-" + secrets.token_hex(8)
    settings = Settings(bootstrap_key=plain)
    replicas = [ConfiguredKeys.from_settings(store_for(client, prefix), settings) for _ in range(3)]
    # Three replicas starting at once register one key.
    keys = await asyncio.gather(*(r.register() for r in replicas))
    again = (await replicas[0].register())["bootstrap"]
    assert again is not None and {k["bootstrap"].id for k in keys if k["bootstrap"]} == {again.id}
    assert len(await replicas[0].store.list()) == 1
    assert (await replicas[1].store.lookup(plain)) == again
    assert await replicas[0].check() is None
    unset = ConfiguredKeys.from_settings(replicas[0].store, Settings(bootstrap_key=None))
    assert not unset and await unset.register() == {} and await unset.check() is None


@pytest.mark.parametrize(
    ("plain", "why"),
    [
        ("sk-short", "20 to 256 characters"),
        ("pk-" + "x" * 30, "must start with 'sk-'"),
        ("sk-" + "x" * 20 + " y", "printable ASCII"),
        ("sk-" + "x" * 300, "20 to 256 characters"),
    ],
)
async def test_invalid_bootstrap_key_is_reported_never_registered(
    client: aioredis.Redis, prefix: str, plain: str, why: str
) -> None:
    store = store_for(client, prefix)
    keys = ConfiguredKeys.from_settings(store, Settings(bootstrap_key=plain))
    assert await keys.register() == {}
    problem = await keys.check()
    assert problem is not None and "GATEWAY_BOOTSTRAP_KEY is invalid" in problem and why in problem
    assert plain not in problem
    assert await store.list() == []


async def register_demo_key(store: KeyStore, settings: Settings) -> str:
    """What the app's lifespan does in demo mode: the key from the state directory, registered
    with the configured keys."""
    keys = ConfiguredKeys(store)
    plain = await demo_key(settings)
    keys.add("demo", plain, setting="the demo key")
    await keys.register()
    return plain


async def test_demo_key_is_stable(client: aioredis.Redis, prefix: str, tmp_path: Path) -> None:
    store = store_for(client, prefix)
    settings = Settings(state_dir=tmp_path)
    first = await register_demo_key(store, settings)
    assert first == await register_demo_key(store_for(client, prefix), settings)  # a restart
    assert stat.S_IMODE((tmp_path / "demo_key").stat().st_mode) == 0o600
    key = await store.lookup(first)
    assert key is not None and key.name == "demo" and len(await store.list()) == 1


def test_secret_generated_once_and_reused(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", key_secret=None)
    first = load_key_secret(settings)
    path = tmp_path / "state" / "key_secret"
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_secret(settings) == first
    assert load_key_secret(Settings(state_dir=tmp_path, key_secret="x" * 32)) == b"x" * 32
    assert load_key_secret(settings) == first  # an env secret never rewrites the file


def test_cli_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"gwtest-{secrets.token_hex(6)}"
    monkeypatch.setenv("GATEWAY_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("GATEWAY_REDIS_KEY_PREFIX", prefix)
    monkeypatch.setenv("GATEWAY_KEY_SECRET", SECRET.decode())
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    try:
        made = runner.invoke(
            keys_app,
            ["create", "--name", "cli", "--rpm", "5", "--tpm", "0", "--models", "a,b",
             "--models", "c", "--expires-at", "2999-01-01T00:00:00Z"],
        )  # fmt: skip
        assert made.exit_code == 0, made.output
        plain = made.stdout.strip().splitlines()[-1]
        assert plain.startswith("sk-")

        async def check() -> str:
            c = make_client(REDIS_URL, connect_timeout_s=2, socket_timeout_s=5)
            key = await store_for(c, prefix).lookup(plain)  # the server's view
            await c.aclose()
            assert key is not None and key.rpm == 5 and key.tpm is None
            assert key.models == ("a", "b", "c") and key.expires_at is not None
            return key.id

        key_id = asyncio.run(check())
        listed = runner.invoke(keys_app, ["list"])
        assert listed.exit_code == 0 and key_id in listed.stdout and plain not in listed.stdout
        as_json = runner.invoke(keys_app, ["list", "--json"])
        assert '"object": "list"' in as_json.stdout
        assert runner.invoke(keys_app, ["revoke", key_id]).exit_code == 0
        assert runner.invoke(keys_app, ["revoke", key_id]).exit_code == 1
        bad = runner.invoke(keys_app, ["create", "--name", "x", "--expires-at", "soon"])
        assert bad.exit_code != 0
    finally:

        async def cleanup() -> None:
            c = make_client(REDIS_URL)
            async for k in c.scan_iter(match=f"{prefix}:*"):
                await c.delete(k)
            await c.aclose()

        asyncio.run(cleanup())
