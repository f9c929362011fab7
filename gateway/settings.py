"""Configuration: environment variables with prefix ``GATEWAY_`` or a ``.env`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_ID = "meta-llama/llama-3.2-11b-vision-instruct"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class LimitsSettings(BaseSettings):
    """Redis, API-key and rate-limit settings (a base of `Settings`; usable alone by tools)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    redis_failure_mode: Literal["closed", "open"] = "closed"
    # Namespace for every Redis key the gateway writes (tests use a random one).
    redis_key_prefix: str = "gw"
    redis_connect_timeout_s: PositiveFloat = 0.1
    redis_socket_timeout_s: PositiveFloat = 0.15
    # Hard bound on one request-path Redis call, reconnect included (503 comes within it).
    redis_deadline_s: PositiveFloat = 0.2
    redis_max_connections: PositiveInt = 512
    # Limits for new keys; None = unlimited (and that limit's headers are omitted).
    default_rpm: PositiveInt | None = None
    default_tpm: PositiveInt | None = None
    default_max_concurrency: PositiveInt | None = None
    # In-process key cache; <= 1 s keeps revocation visible on every replica within 2 s.
    key_cache_ttl_s: float = Field(default=1.0, ge=0, le=1.0)
    # A concurrency slot expires this long after admission unless renewed; each process
    # renews its live requests' slots every third of it, so a dead replica's free within it.
    concurrency_lease_ttl_s: PositiveFloat = 10.0


class Settings(LimitsSettings):
    """All gateway settings. Built once at start-up and injected; never a module global."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=".env", extra="ignore", populate_by_name=True
    )

    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".local/state/llama-gateway")

    # The model(s): the local engine, and/or the routes file of upstream engines.
    model_path: Path | None = None
    routes_file: Path | None = None
    model_id: str = DEFAULT_MODEL_ID
    model_aliases: list[str] = Field(
        default_factory=lambda: ["meta-llama/Llama-3.2-11B-Vision-Instruct"]
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "batch": transformers forward passes, requests batched between batches (proven, simple).
    # "fast": own decode loop with slot KV cache and continuous batching (model/fast).
    engine: Literal["batch", "fast"] = "batch"
    engine_cache_gib: float | None = None  # fast engine: KV memory budget (None: from free)
    engine_max_slots: int = 64
    engine_max_waiting: int = 256  # fast engine: queued requests beyond this get 503
    max_batch_size: int = 8
    default_max_tokens: int = 512
    # Upper bound for max_tokens when the client sends none and the context is smaller.
    context_length: int | None = None

    # Intake limits
    max_body_bytes: int = 25 * 1024 * 1024
    max_images_per_request: int = 1
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_messages: int = 256
    # /v1/moderations: at most this many strings (or parts) in one request's `input`.
    moderation_max_inputs: PositiveInt = 32
    image_fetch_timeout_s: float = 10.0
    image_fetch_max_redirects: int = 3
    # Hosts or CIDR networks that image URLs may reach even though they are private/loopback.
    image_fetch_allow: list[str] = Field(default_factory=list)

    # Redis, keys, policies (used by their own modules)
    redis_url: str | None = None
    admin_token: str | None = None
    key_secret: str | None = None
    bootstrap_key: str | None = None
    policy_dir: Path = PROJECT_ROOT / "policies"
    default_policy: str = "default"
    prompt_guard_path: Path | None = None
    llama_guard_path: Path | None = None
    # Code Shield (optional extra): scans run in this many worker threads (each scan may start
    # one semgrep process), and one semgrep run is stopped after this many seconds.
    code_shield_workers: int = Field(default=2, ge=1, le=64)
    code_shield_semgrep_timeout_s: float = Field(default=10.0, gt=0, le=120)

    # Audit log of guard decisions (gateway.audit): a Redis stream capped by length and age.
    audit_enabled: bool = True
    audit_redis_url: str | None = None  # unset: the gateway's Redis
    audit_max_entries: PositiveInt = 100_000
    audit_max_age_s: PositiveFloat = 7 * 24 * 3600.0
    audit_queue_size: PositiveInt = 10_000

    # Server behaviour
    shutdown_grace_s: float = 30.0
    log_level: str = "info"

    @property
    def demo_mode(self) -> bool:
        return self.model_path is None and self.routes_file is None
