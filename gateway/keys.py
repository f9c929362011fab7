"""API keys: generation, keyed-hash storage in Redis, cached lookup (secret: `gateway.key_secret`).

The plain key (`sk-` + 32 random bytes, url-safe) is shown once and never stored: Redis holds
HMAC-SHA256(secret, key) only, so a Redis dump alone cannot be replayed as credentials.
Layout (all share the `{keys}` hash tag, i.e. one Cluster slot, so one Lua script can update
them together):

    <prefix>:{keys}:records   id -> JSON record
    <prefix>:{keys}:by_hash   hex HMAC -> id
    <prefix>:{keys}:revoked   set of the hex HMACs of deleted keys (see `KeyStore.restore`)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from gateway.errors import KeyConflict, ServiceUnavailable
from gateway.key_secret import load_key_secret
from gateway.redis_conn import REDIS_ERRORS, RedisMetrics, with_deadline
from gateway.redis_scripts import load_lua_scripts
from gateway.settings import Settings

log = structlog.get_logger(__name__)

KEY_PREFIX = "sk-"
# Keys given by an operator (the bootstrap key, imported keys): `sk-`, then printable ASCII
# without spaces (they travel in an HTTP header), 20 to 256 characters in all.
PLAIN_KEY_MIN_LEN = 20
PLAIN_KEY_MAX_LEN = 256
_PLAIN_KEY = re.compile(r"sk-[!-~]+")
_CACHE_MAX = 10_000
# In fail-open mode a key validated this recently still authenticates while Redis is down.
_STALE_S = 600.0


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # "use the limit from settings" (None means unlimited)


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def plain_key_problem(plain: str) -> str | None:
    """Why an operator-given key is not acceptable, or None. Never repeats the key."""
    if not plain.startswith(KEY_PREFIX):
        return f"an API key must start with '{KEY_PREFIX}'"
    if not PLAIN_KEY_MIN_LEN <= len(plain) <= PLAIN_KEY_MAX_LEN:
        return (
            f"an API key must be {PLAIN_KEY_MIN_LEN} to {PLAIN_KEY_MAX_LEN} characters long "
            f"(this one has {len(plain)})"
        )
    if not _PLAIN_KEY.fullmatch(plain):
        return "an API key may contain only printable ASCII characters, without spaces"
    return None


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def rfc3339(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ApiKey:
    """One key's metadata. Limits of None are unlimited; `models` None allows every model."""

    id: str
    name: str
    key_hash: str
    hint: str
    created_at: datetime
    expires_at: datetime | None = None
    disabled: bool = False
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    models: tuple[str, ...] | None = None
    policy: str | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_concurrency is None

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at

    def allows_model(
        self, model: str, canonical: Callable[[str], str | None] | None = None
    ) -> bool:
        """Allow-list check; entries may be aliases or ids not served yet."""
        if not self.models:
            return True
        for entry in self.models:
            if entry == model or entry.lower() == model.lower():
                return True
            if canonical is not None and canonical(entry) == model:
                return True
        return False

    def public(self) -> dict[str, Any]:
        """The admin API's view: everything but the hash."""
        return {
            "object": "api_key",
            "id": self.id,
            "name": self.name,
            "hint": self.hint,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "disabled": self.disabled,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrency": self.max_concurrency,
            "models": list(self.models) if self.models is not None else None,
            "policy": self.policy,
        }

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.timestamp()
        data["expires_at"] = self.expires_at.timestamp() if self.expires_at else None
        data["models"] = list(self.models) if self.models is not None else None
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> ApiKey:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["created_at"] = _utc(known["created_at"])
        known["expires_at"] = _utc(known.get("expires_at"))
        models = known.get("models")
        known["models"] = tuple(models) if models else None
        return cls(**known)


@dataclass(frozen=True)
class LimitDefaults:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


_SCRIPTS = load_lua_scripts(Path(__file__).with_name("keys.lua"))

_MUTABLE = {"name", "expires_at", "disabled", "rpm", "tpm", "max_concurrency", "models", "policy"}


@dataclass
class _Entry:
    key: ApiKey | None
    at: float = field(default_factory=time.monotonic)


class KeyStore:
    """API keys in Redis, with a short in-process lookup cache (TTL <= 1 s).

    Admin operations raise `ServiceUnavailable` when Redis is unreachable.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        secret: bytes,
        *,
        prefix: str = "gw",
        cache_ttl_s: float = 1.0,
        defaults: LimitDefaults = LimitDefaults(),
        deadline_s: float = 0.2,
        metrics: RedisMetrics | None = None,
    ) -> None:
        self.client = client
        self._secret = secret
        self.prefix = prefix
        self.cache_ttl_s = cache_ttl_s
        self.defaults = defaults
        self.deadline_s = deadline_s
        self.metrics = metrics
        self._records = f"{prefix}:{{keys}}:records"
        self._by_hash = f"{prefix}:{{keys}}:by_hash"
        self._revoked = f"{prefix}:{{keys}}:revoked"
        self._create = client.register_script(_SCRIPTS["create"])
        self._lookup = client.register_script(_SCRIPTS["lookup"])
        self._replace = client.register_script(_SCRIPTS["replace"])
        self._delete = client.register_script(_SCRIPTS["delete"])
        self._cache: dict[str, _Entry] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: aioredis.Redis,
        *,
        metrics: RedisMetrics | None = None,
        deadline_s: float | None = None,
    ) -> KeyStore:
        return cls(
            client,
            load_key_secret(settings),
            prefix=settings.redis_key_prefix,
            cache_ttl_s=min(settings.key_cache_ttl_s, 1.0),
            defaults=LimitDefaults(
                settings.default_rpm, settings.default_tpm, settings.default_max_concurrency
            ),
            deadline_s=deadline_s or settings.redis_deadline_s,
            metrics=metrics,
        )

    def hash_key(self, plain: str) -> str:
        return hmac.new(self._secret, plain.encode(), hashlib.sha256).hexdigest()

    async def _call(self, operation: str, awaitable: Any) -> Any:
        try:
            return await with_deadline(awaitable, self.deadline_s)
        except REDIS_ERRORS as exc:
            if self.metrics is not None:
                self.metrics.redis_errors.labels(operation).inc()
            log.warning("redis error", operation=operation, error=type(exc).__name__)
            raise ServiceUnavailable(
                "The API key store (Redis) is unreachable; try again shortly."
            ) from exc

    async def create(
        self,
        name: str,
        *,
        rpm: int | None = DEFAULT,
        tpm: int | None = DEFAULT,
        max_concurrency: int | None = DEFAULT,
        models: list[str] | tuple[str, ...] | None = None,
        policy: str | None = None,
        expires_at: datetime | None = None,
        plain_key: str | None = None,
    ) -> tuple[ApiKey, str, bool]:
        """Store a new key; returns (record, plain key, True).

        `plain_key` imports an operator's own key (restoring keys from their records after
        Redis lost them): it must pass `plain_key_problem` (else ValueError), and a key that
        is already stored raises `KeyConflict` (409) naming the existing id. An import lifts
        a revocation of the same key.
        """
        if plain_key is not None and (problem := plain_key_problem(plain_key)):
            raise ValueError(problem)
        plain = plain_key or generate_key()
        key = self._new_record(name, plain, rpm, tpm, max_concurrency, models, policy, expires_at)
        status, key_id = await self._put(key, "import" if plain_key else "new")
        if status == 0:
            raise KeyConflict(
                f"An API key with this value already exists (id '{key_id}').",
                param="key",
                code="key_exists",
            )
        log.info("api key created", key_id=key.id, name=name, imported=plain_key is not None)
        return key, plain, True

    async def restore(self, name: str, plain: str) -> tuple[ApiKey | None, bool]:
        """Register a key of the gateway's own configuration (the bootstrap key, the demo's)
        unless it is there already; idempotent, so replicas may race. Returns (record,
        created), or (None, False) when the key was revoked through the API or the CLI: a
        revocation stands until the key is imported again (`create(plain_key=...)`), while a
        Redis that lost its data (the revocation with it) gets the key back."""
        key = self._new_record(name, plain, DEFAULT, DEFAULT, DEFAULT, None, None, None)
        status, key_id = await self._put(key, "restore")
        if status < 0:
            return None, False
        if status == 0:
            existing = await self.get(key_id)
            if existing is None:  # deleted in between; vanishingly unlikely
                raise ServiceUnavailable("The API key changed concurrently; try again.")
            return existing, False
        log.info("api key registered", key_id=key.id, name=name)
        return key, True

    def _new_record(
        self,
        name: str,
        plain: str,
        rpm: int | None,
        tpm: int | None,
        max_concurrency: int | None,
        models: list[str] | tuple[str, ...] | None,
        policy: str | None,
        expires_at: datetime | None,
    ) -> ApiKey:
        return ApiKey(
            id="key_" + secrets.token_hex(12),
            name=name,
            key_hash=self.hash_key(plain),
            hint=f"{plain[:3]}...{plain[-4:]}",
            created_at=datetime.fromtimestamp(round(time.time(), 3), UTC),
            expires_at=expires_at,
            rpm=self.defaults.rpm if rpm is DEFAULT else rpm,
            tpm=self.defaults.tpm if tpm is DEFAULT else tpm,
            max_concurrency=(
                self.defaults.max_concurrency if max_concurrency is DEFAULT else max_concurrency
            ),
            models=tuple(models) if models else None,
            policy=policy,
        )

    async def _put(self, key: ApiKey, mode: str) -> tuple[int, str]:
        keys = [self._records, self._by_hash, self._revoked]
        status, key_id = await self._call(
            "key_create", self._create(keys=keys, args=[key.id, key.key_hash, key.to_json(), mode])
        )
        if int(status) > 0:
            self._cache.clear()  # drop a cached "unknown key" for this hash
        return int(status), str(key_id)

    async def get(self, key_id: str) -> ApiKey | None:
        raw = await self._call("key_get", self.client.hget(self._records, key_id))
        return ApiKey.from_json(raw) if raw else None

    async def list(self) -> list[ApiKey]:
        raw = await self._call("key_list", self.client.hgetall(self._records))
        keys = [ApiKey.from_json(v) for v in raw.values()]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def update(self, key_id: str, **changes: Any) -> ApiKey | None:
        """Change mutable fields (compare-and-set, so concurrent PATCHes never lose updates)."""
        unknown = set(changes) - _MUTABLE
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}")
        if "models" in changes:
            changes["models"] = tuple(changes["models"]) if changes["models"] else None
        for _ in range(10):
            raw = await self._call("key_get", self.client.hget(self._records, key_id))
            if not raw:
                return None
            new = replace(ApiKey.from_json(raw), **changes)
            ok = await self._call(
                "key_update",
                self._replace(keys=[self._records], args=[key_id, raw, new.to_json()]),
            )
            if ok:
                self._cache.clear()
                log.info("api key updated", key_id=key_id, fields=sorted(changes))
                return new
        raise ServiceUnavailable("The API key is being changed concurrently; try again.")

    async def delete(self, key_id: str) -> bool:
        deleted = await self._call(
            "key_delete",
            self._delete(keys=[self._records, self._by_hash, self._revoked], args=[key_id]),
        )
        self._cache.clear()
        if deleted:
            log.info("api key deleted", key_id=key_id)
        return bool(deleted)

    async def lookup(self, plain: str, *, stale_ok: bool = False) -> ApiKey | None:
        """The key's record, or None when unknown; cached for `cache_ttl_s`.

        With `stale_ok` (fail-open mode) a record cached within the last 10 minutes is
        returned when Redis is unreachable; unknown keys still get ServiceUnavailable.
        """
        digest = self.hash_key(plain)
        now = time.monotonic()
        entry = self._cache.get(digest)
        if entry is not None and now - entry.at < self.cache_ttl_s:
            return entry.key
        try:
            raw = await self._call(
                "key_lookup", self._lookup(keys=[self._records, self._by_hash], args=[digest])
            )
        except ServiceUnavailable:
            if stale_ok and entry is not None and entry.key and now - entry.at < _STALE_S:
                return entry.key
            raise
        key = ApiKey.from_json(raw) if raw else None
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()  # bounded memory under a flood of random keys
        self._cache[digest] = _Entry(key, now)
        return key

    def invalidate(self) -> None:
        self._cache.clear()
