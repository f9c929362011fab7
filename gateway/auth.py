"""Request authentication, and the demo's key.

The chat route calls `AuthService.authenticate` (`Authorization: Bearer sk-...` -> `ApiKey`,
or 401 / 403); the admin router uses `check_admin_token`. Error messages never echo the
presented key (it would end up in logs).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable

from gateway.configured_keys import ConfiguredKeys
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.key_secret import read_or_create_private
from gateway.keys import ApiKey, KeyStore, generate_key
from gateway.model_router import ModelRouter
from gateway.settings import Settings

DEMO_KEY_FILE = "demo_key"


async def demo_key(settings: Settings) -> str:
    """The demo's key: generated once into `<state_dir>/demo_key` (0600), so `gateway serve`
    prints the same key on every start. The app registers it with its configured keys (in the
    background, retried while Redis is slow or away: start-up never waits on Redis)."""
    return await asyncio.to_thread(
        read_or_create_private, settings.state_dir / DEMO_KEY_FILE, generate_key
    )


class AuthService:
    """Turns an Authorization header and a canonical model id into an `ApiKey`, or raises."""

    def __init__(
        self,
        store: KeyStore,
        *,
        canonical_model: Callable[[str], str | None] | None = None,
        failure_mode: str = "closed",
        configured: ConfiguredKeys | None = None,
    ) -> None:
        self.store = store
        self.canonical_model = canonical_model
        self.fail_open = failure_mode == "open"
        # The bootstrap / demo key, restored on a miss (Redis lost its data).
        self.configured = configured

    @classmethod
    def from_settings(
        cls,
        store: KeyStore,
        settings: Settings,
        router: ModelRouter,
        *,
        configured: ConfiguredKeys | None = None,
    ) -> AuthService:
        """A key's allow-list may name a served model by any of the router's names for it."""
        return cls(
            store,
            canonical_model=router.canonical_model_id,
            failure_mode=settings.redis_failure_mode,
            configured=configured,
        )

    async def authenticate(self, authorization: str | None, model: str | None = None) -> ApiKey:
        """The caller's key, or AuthenticationFailed (401) / PermissionDenied (403).

        Pass `model=None` to authenticate before the body is parsed (401 comes before 400),
        then call `check_model` with the canonical model id.
        """
        token = bearer_token(authorization)
        if not token:
            raise AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        key = await self.store.lookup(token, stale_ok=self.fail_open)
        if key is None and self.configured is not None:
            key = await self.configured.recover(token)
        if key is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. Ask your gateway operator for a valid key."
            )
        if key.disabled:
            raise AuthenticationFailed("This API key has been disabled.")
        if key.is_expired():
            raise AuthenticationFailed("This API key has expired.")
        if model is not None:
            self.check_model(key, model)
        return key

    def check_model(self, key: ApiKey, model: str) -> None:
        if not key.allows_model(model, self.canonical_model):
            raise PermissionDenied(
                f"This API key is not allowed to use the model '{model}'.", param="model"
            )


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_admin_token(authorization: str | None, admin_token: str) -> bool:
    token = bearer_token(authorization)
    # Constant-time comparison: the admin token must not leak through timing.
    return token is not None and hmac.compare_digest(token.encode(), admin_token.encode())
