"""API keys: generation, keyed-hash storage in Redis, cached lookup, the hashing secret.

The plain key (`sk-` + 32 random bytes, url-safe) is shown once and never stored: Redis holds
HMAC-SHA256(secret, key) only, so a Redis dump alone cannot be replayed as credentials.
Layout (both hashes share the `{keys}` hash tag, i.e. one Cluster slot, so one Lua script
can update them together):

    <prefix>:{keys}:records   id -> JSON record
    <prefix>:{keys}:by_hash   hex HMAC -> id
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from gateway.errors import ServiceUnavailable
from gateway.redis_conn import REDIS_ERRORS, RedisMetrics, limits_settings, with_deadline

log = structlog.get_logger(__name__)

KEY_PREFIX = "sk-"
SECRET_FILE = "key_secret"
_CACHE_MAX = 10_000
# In fail-open mode a key validated this recently still authenticates while Redis is down.
_STALE_S = 600.0


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # "use the limit from settings" (None means unlimited)


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


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


def load_key_secret(settings: object) -> bytes:
    """`GATEWAY_KEY_SECRET`, else `<state_dir>/key_secret`, created once with mode 0600.

    Every replica and the CLI must hash with the same secret: set GATEWAY_KEY_SECRET (or share
    the state directory) in multi-replica deployments.
    """
    configured: str | None = getattr(settings, "key_secret", None)
    if configured:
        if len(configured) < 16:
            log.warning("GATEWAY_KEY_SECRET is short; use at least 32 random characters")
        return configured.encode()
    path = Path(getattr(settings, "state_dir")) / SECRET_FILE  # noqa: B009
    return read_or_create_private(path, lambda: secrets.token_urlsafe(48)).encode()


def read_or_create_private(path: Path, make: Callable[[], str]) -> str:
    """A private (0600) file's content, created with `make()` by the first process to try."""
    for _ in range(50):
        if path.exists():
            value = path.read_text().strip()
            if value:
                if path.stat().st_mode & 0o077:
                    log.warning("private file is readable by others", path=str(path))
                return value
            time.sleep(0.01)  # another process is writing it
            continue
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Write a private temp file, then link it into place: creation is atomic and the
        # first process wins when several start at once.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make() + "\n")
        try:
            os.link(tmp, path)
            log.info("created private file", path=str(path))
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    raise RuntimeError(f"cannot read {path}")


_CREATE = """
local existing = redis.call('HGET', KEYS[2], ARGV[2])
if existing and redis.call('HEXISTS', KEYS[1], existing) == 1 then
  return {0, existing}
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[1]}
"""
_LOOKUP = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[1], id)
"""
_REPLACE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
_DELETE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local h = cjson.decode(raw)['key_hash']
redis.call('HDEL', KEYS[1], ARGV[1])
if h and redis.call('HGET', KEYS[2], h) == ARGV[1] then redis.call('HDEL', KEYS[2], h) end
return 1
"""

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
        self._create = client.register_script(_CREATE)
        self._lookup = client.register_script(_LOOKUP)
        self._replace = client.register_script(_REPLACE)
        self._delete = client.register_script(_DELETE)
        self._cache: dict[str, _Entry] = {}

    @classmethod
    def from_settings(
        cls,
        settings: object,
        client: aioredis.Redis,
        *,
        metrics: RedisMetrics | None = None,
        deadline_s: float | None = None,
    ) -> KeyStore:
        extra = limits_settings(settings)
        return cls(
            client,
            load_key_secret(settings),
            prefix=extra.redis_key_prefix,
            cache_ttl_s=min(extra.key_cache_ttl_s, 1.0),
            defaults=LimitDefaults(
                extra.default_rpm, extra.default_tpm, extra.default_max_concurrency
            ),
            deadline_s=deadline_s or extra.redis_deadline_s,
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
        """Store a key; returns (record, plain key, created). Idempotent for a given plain key."""
        plain = plain_key or generate_key()
        key = ApiKey(
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
        keys = [self._records, self._by_hash]
        created, key_id = await self._call(
            "key_create", self._create(keys=keys, args=[key.id, key.key_hash, key.to_json()])
        )
        if not created:
            existing = await self.get(key_id)
            if existing is None:  # deleted in between; vanishingly unlikely
                raise ServiceUnavailable("The API key changed concurrently; try again.")
            return existing, plain, False
        self._cache.clear()  # drop a cached "unknown key" for this hash
        log.info("api key created", key_id=key.id, name=name)
        return key, plain, True

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
            "key_delete", self._delete(keys=[self._records, self._by_hash], args=[key_id])
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
