"""Shared by the tests that use the real Redis directly (keys, rate limits, admin API).

Each test gets its own random key prefix, and its keys are removed afterwards. A module whose
tests all need the Redis at 127.0.0.1:6379 sets `pytestmark = requires_redis`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

import tests.conftest
from gateway.keys import ApiKey, KeyStore
from gateway.redis_conn import make_client
from gateway.settings import Settings
from tests.conftest import LiveServer, wait_until_ready

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", tests.conftest.REDIS_URL)
SECRET = b"test-secret-0123456789abcdef"


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        return "127.0.0.1:6379" not in REDIS_URL
    return True


requires_redis = pytest.mark.skipif(not _redis_up(), reason="needs Redis at 127.0.0.1:6379")

PROJECT_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def copy_project_policies(target: Path) -> Path:
    """The shipped policies copied into `target`: tests that save, add or watch policies work on
    the copy, never on the project's own directory."""
    for path in PROJECT_POLICIES.glob("*.yaml"):
        shutil.copy(path, target / path.name)
    return target


@contextmanager
def live_gateway(settings: Settings, **changes: Any) -> Iterator[LiveServer]:
    """The app over `settings` (with `changes`), served on a free port, once it is ready."""
    from gateway.app import create_app

    with LiveServer(create_app(settings.model_copy(update=changes))) as live:
        wait_until_ready(live.base_url)
        yield live


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    c = make_client(REDIS_URL, connect_timeout_s=2, socket_timeout_s=5)
    yield c
    await c.aclose()


@pytest_asyncio.fixture
async def prefix(client: aioredis.Redis) -> AsyncIterator[str]:
    p = f"gwtest-{secrets.token_hex(6)}"
    yield p
    async for k in client.scan_iter(match=f"{p}:*"):
        await client.delete(k)


def store_for(client: aioredis.Redis, prefix: str, **kw: object) -> KeyStore:
    kw.setdefault("deadline_s", 5.0)
    return KeyStore(client, SECRET, prefix=prefix, **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(client: aioredis.Redis, prefix: str) -> KeyStore:
    return store_for(client, prefix)


def make_key(**limits: int | None) -> ApiKey:
    """A key that was never stored (the rate limiter needs only its id and limits)."""
    return ApiKey(
        id="key_" + secrets.token_hex(6),
        name="t",
        key_hash="h",
        hint="sk-...",
        created_at=datetime.now(UTC),
        **limits,  # type: ignore[arg-type]
    )
