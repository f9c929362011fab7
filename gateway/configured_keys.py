"""The API keys of the gateway's own configuration, kept registered while Redis comes and goes.

`GATEWAY_BOOTSTRAP_KEY` (the Helm chart's generated key, too) and the demo's key are registered
at start. A Redis that loses its data (a restart without persistence, a failover to an empty
replica, FLUSHALL) would lose them, and every request would get 401 until each replica
restarted. So they are registered again when found missing, without a Redis write per request:

- on a lookup miss: a request whose key is unknown and equals a configured key (compared only
  then, so the hot path pays nothing) restores it and is served. At most one restore runs at a
  time, and its result stands for `recheck_s` (1 s), so a flood of requests with a revoked
  bootstrap key costs one Redis call per second, not one per request;
- on every `/readyz` probe (`check`): one read-only script call while the key is there, a
  restore when it is not, and the probe fails (503, with the reason) when the key cannot be
  registered: an invalid `GATEWAY_BOOTSTRAP_KEY`, a read-only replica, a full Redis, an ACL
  that forbids the writes.

A key deleted through the admin API or the CLI stays deleted (`KeyStore.restore`): deleting
records a revocation, which a Redis that lost its data has lost too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass

import structlog
from redis.exceptions import ResponseError

from gateway.errors import ServiceUnavailable
from gateway.keys import ApiKey, KeyStore, plain_key_problem
from gateway.settings import Settings

log = structlog.get_logger(__name__)

RECHECK_S = 1.0


@dataclass(frozen=True)
class ConfiguredKey:
    name: str  # the record's name: "bootstrap" or "demo"
    plain: str
    setting: str  # where it comes from, for messages


class ConfiguredKeys:
    """Registers, watches and restores the configured keys of one app."""

    def __init__(self, store: KeyStore, *, recheck_s: float = RECHECK_S) -> None:
        self.store = store
        self.recheck_s = recheck_s
        self._keys: list[ConfiguredKey] = []
        self._invalid: list[str] = []  # configured keys that can never be registered
        self._restoring: asyncio.Future[dict[str, ApiKey | None]] | None = None
        self._last: dict[str, ApiKey | None] = {}
        self._last_at = -float("inf")
        self.problem: str | None = None  # why the last restore failed, or None
        self._registered = False  # once: later registrations are restorations

    @classmethod
    def from_settings(cls, store: KeyStore, settings: Settings) -> ConfiguredKeys:
        keys = cls(store)
        plain = settings.bootstrap_key
        if plain:
            keys.add("bootstrap", plain, setting="GATEWAY_BOOTSTRAP_KEY")
        return keys

    def add(self, name: str, plain: str, *, setting: str) -> None:
        if problem := plain_key_problem(plain):
            # Never raised: readyz reports it, and the other keys still work.
            message = f"{setting} is invalid: {problem}"
            log.error("configured api key is invalid", setting=setting, problem=problem)
            self._invalid.append(message)
            return
        self._keys.append(ConfiguredKey(name, plain, setting))
        self._last_at = -float("inf")

    def __bool__(self) -> bool:
        return bool(self._keys or self._invalid)

    async def register(self, *, retry_interval_s: float | None = None) -> dict[str, ApiKey | None]:
        """Register every configured key (at start). With `retry_interval_s`, waits for Redis
        instead of raising ServiceUnavailable (run it as a background task so the gateway
        starts, and readyz reports Redis, while Redis is down)."""
        while True:
            try:
                return await self.restore(force=True)
            except ServiceUnavailable:
                if retry_interval_s is None:
                    raise
                await asyncio.sleep(retry_interval_s)

    async def recover(self, token: str) -> ApiKey | None:
        """For a request whose key the store does not know: when it is a configured key,
        restore it and return its record (None otherwise, or when it was revoked)."""
        for key in self._keys:
            # Constant time: this comparison must not tell an attacker how close a guess is.
            if hmac.compare_digest(key.plain.encode(), token.encode()):
                return (await self.restore()).get(key.name)
        return None

    async def check(self) -> str | None:
        """For /readyz: None when every configured key is registered (or was revoked on
        purpose), else why not. Restores a missing key."""
        if self._invalid:
            return "; ".join(self._invalid)
        if not self._keys:
            return None
        with contextlib.suppress(ServiceUnavailable):  # self.problem says why
            await self.restore(force=True)
        return self.problem

    async def restore(self, *, force: bool = False) -> dict[str, ApiKey | None]:
        """Each configured key's record (None: revoked), registering the missing ones. One
        restore at a time; without `force`, a result younger than `recheck_s` is reused."""
        if not force and time.monotonic() - self._last_at < self.recheck_s:
            return self._last
        if self._restoring is None:
            self._restoring = asyncio.ensure_future(self._restore())
            self._restoring.add_done_callback(self._restored)
        return await asyncio.shield(self._restoring)

    def _restored(self, done: asyncio.Future[dict[str, ApiKey | None]]) -> None:
        self._restoring = None
        if not done.cancelled() and done.exception() is None:
            self._last, self._last_at = done.result(), time.monotonic()

    async def _restore(self) -> dict[str, ApiKey | None]:
        records: dict[str, ApiKey | None] = {}
        setting = ""
        try:
            for key in self._keys:
                setting = key.setting
                record, created = await self.store.restore(key.name, key.plain)
                records[key.name] = record
                if created and self._registered:
                    # After a loss of Redis data: the first replica to notice says so (the
                    # others find the key there).
                    log.warning(
                        "configured api key was missing (Redis lost its data?); registered "
                        "it again",
                        key=key.name,
                        key_id=record.id if record else None,
                    )
                elif record is None and self._last.get(key.name, True) is not None:
                    # Once per change, not on every readyz probe.
                    log.warning("configured api key was revoked; not registering it", key=key.name)
        except ServiceUnavailable as exc:
            # Only an error that Redis answered (read-only, out of memory, no permission) is
            # the key's problem; a timeout is Redis being slow or away, which readyz's own
            # Redis check reports (and a busy moment must not take the replica out).
            self.problem = None
            if isinstance(exc.__cause__, ResponseError):
                self.problem = f"cannot register {setting} in Redis: {_cause(exc)}"
            raise
        self.problem = None
        self._registered = True
        return records


def _cause(exc: BaseException) -> str:
    """The Redis error behind a ServiceUnavailable, in one short line (no key material: Redis
    errors name commands and key names, which are hashes and prefixes)."""
    cause = exc.__cause__ or exc
    text = str(cause).splitlines()[0][:160] if str(cause) else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
