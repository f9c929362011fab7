"""Admin API for API keys: `POST/GET /admin/keys`, `GET/PATCH/DELETE /admin/keys/{id}`.

Mount with `app.include_router(gateway.admin.router)`. The routes take their dependencies as
parameters (FastAPI `Depends`, from the app's `gateway.services`):

- `request_settings`: the gateway `Settings` (`admin_token`);
- `key_store`: the app's `gateway.keys.KeyStore`;
- `policy_exists`: `Callable[[str], bool]`, whether a policy is loaded (unknown names get 400).

`POST /admin/keys` with `"key": "sk-..."` imports an operator's own key (`sk-`, 20-256
printable ASCII characters): 201 as for a new key, or 409 (`code: "key_exists"`, naming the
existing id) when that key is stored already, so re-running an import is safe.

Authentication is `Authorization: Bearer <GATEWAY_ADMIN_TOKEN>`; a wrong or missing token gets
401. With no admin token configured the admin API is disabled and answers 404
(`code: "admin_disabled"`), as if it did not exist: nothing to guess at, and the message says
how to enable it. Bodies are parsed here (not by FastAPI) so that every bad body is a 400 in
the OpenAI envelope, with `param` naming the field, never a 422.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from gateway.auth import check_admin_token
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound
from gateway.keys import KeyStore, plain_key_problem
from gateway.services import ServicesDep, SettingsDep

M = TypeVar("M", bound=BaseModel)

LimitValue = Annotated[int, Field(ge=1, le=10**12)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class _Body(BaseModel):
    # strict: "50" or true is not a limit; extra="forbid": a typo like "rpn" is an error,
    # not a silently unlimited key.
    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: LimitValue | None = None
    tpm: LimitValue | None = None
    max_concurrency: LimitValue | None = None
    models: Annotated[list[Text], Field(max_length=256)] | None = None
    policy: Text | None = None
    expires_at: str | None = None  # RFC 3339; parsed by `_parse_time`


class CreateKeyBody(_Body):
    name: Text
    # An operator's own key to import (restoring keys from their records after Redis lost
    # them); absent: a new key is generated.
    key: Annotated[str, Field(max_length=1024)] | None = None


class PatchKeyBody(_Body):
    name: Text | None = None
    disabled: bool | None = None


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """Dependency: 404 when the admin API is disabled, 401 on a wrong or missing token."""
    token = settings.admin_token
    if not token:
        raise NotFound(
            "The admin API is disabled: set GATEWAY_ADMIN_TOKEN to enable it.",
            code="admin_disabled",
        )
    if not check_admin_token(request.headers.get("authorization"), token):
        raise AuthenticationFailed(
            "Invalid or missing admin token. Send 'Authorization: Bearer <GATEWAY_ADMIN_TOKEN>'."
        )


async def key_store(services: ServicesDep) -> KeyStore:
    return services.key_store


async def policy_exists(services: ServicesDep) -> Callable[[str], bool]:
    """Whether a policy of that name is loaded: a key may name only such a policy."""
    return services.guards.store.__contains__


KeyStoreDep = Annotated[KeyStore, Depends(key_store)]
PolicyExistsDep = Annotated[Callable[[str], bool], Depends(policy_exists)]

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


async def _parse(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            where = ".".join(str(p) for p in err["loc"])
            message = f"Invalid value for '{where}': {err['msg']}."
        raise InvalidRequest(message, param=param) from exc


def _parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp with an offset, in the future."""
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in text.upper():
        raise InvalidRequest(
            "Invalid value for 'expires_at': expected an RFC 3339 time such as "
            "'2030-01-01T00:00:00Z'.",
            param="expires_at",
        )
    if parsed <= datetime.now(UTC):
        raise InvalidRequest("'expires_at' must be in the future.", param="expires_at")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00 is past datetime.max in UTC
        raise InvalidRequest(
            "Invalid value for 'expires_at': out of range.", param="expires_at"
        ) from None


def _changes(body: _Body, policy_exists: Callable[[str], bool]) -> dict[str, Any]:
    """The fields the client sent (explicit null included: it means unlimited / no expiry)."""
    changes: dict[str, Any] = {f: getattr(body, f) for f in body.model_fields_set}
    for f in ("name", "disabled"):
        if f in changes and changes[f] is None:
            raise InvalidRequest(f"'{f}' cannot be null.", param=f)
    if changes.get("expires_at") is not None:
        changes["expires_at"] = _parse_time(changes["expires_at"])
    policy = changes.get("policy")
    if policy is not None and not policy_exists(policy):
        raise InvalidRequest(f"Unknown policy '{policy}'.", param="policy")
    return changes


@router.post("/keys", status_code=201)
async def create_key(
    request: Request, store: KeyStoreDep, policy_exists: PolicyExistsDep
) -> JSONResponse:
    body = await _parse(request, CreateKeyBody)
    changes = _changes(body, policy_exists)
    name = changes.pop("name")
    imported = changes.pop("key", None)
    if imported is not None and (problem := plain_key_problem(imported)):
        raise InvalidRequest(f"Invalid value for 'key': {problem}.", param="key")
    # An imported key that exists already: 409 (code key_exists) naming its id.
    key, plain, _ = await store.create(name, plain_key=imported, **changes)
    # The only time the plain key leaves the gateway (an imported one: echoed back).
    return JSONResponse({**key.public(), "key": plain}, status_code=201)


@router.get("/keys")
async def list_keys(store: KeyStoreDep) -> JSONResponse:
    keys = await store.list()
    return JSONResponse({"object": "list", "data": [k.public() for k in keys]})


@router.get("/keys/{key_id}")
async def get_key(key_id: str, store: KeyStoreDep) -> JSONResponse:
    key = await store.get(key_id)
    if key is None:
        raise _not_found(key_id)
    return JSONResponse(key.public())


@router.patch("/keys/{key_id}")
async def patch_key(
    key_id: str, request: Request, store: KeyStoreDep, policy_exists: PolicyExistsDep
) -> JSONResponse:
    body = await _parse(request, PatchKeyBody)
    key = await store.update(key_id, **_changes(body, policy_exists))
    if key is None:
        raise _not_found(key_id)
    return JSONResponse(key.public())


@router.delete("/keys/{key_id}", status_code=204)
async def delete_key(key_id: str, store: KeyStoreDep) -> Response:
    if not await store.delete(key_id):
        raise _not_found(key_id)
    return Response(status_code=204)


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id '{key_id}'.", param="id")
