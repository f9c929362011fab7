"""`gateway keys create|list|revoke`: API keys from the command line.

Works on the same Redis (GATEWAY_REDIS_URL, or the embedded server's data in the state
directory) and the same secret (GATEWAY_KEY_SECRET or `<state_dir>/key_secret`) as the server,
so a key created here works on every replica at once. Mounted by the main CLI with
`cli.add_typer(keys_cli.app, name="keys")`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import structlog
import typer

from gateway.errors import GatewayError
from gateway.keys import DEFAULT, ApiKey, KeyStore, plain_key_problem
from gateway.logging import configure_logging
from gateway.redis_conn import RedisConnection
from gateway.settings import Settings

T = TypeVar("T")

app = typer.Typer(help="Manage API keys (stored in the gateway's Redis).", no_args_is_help=True)


def _run(operation: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def main() -> T:
        settings = Settings()
        # A CLI may talk to a remote Redis over TLS: allow more than the request path's deadline.
        conn = await RedisConnection.open(
            settings, connect_timeout_s=5.0, socket_timeout_s=5.0, deadline_s=10.0
        )
        try:
            store = KeyStore.from_settings(settings, conn.client, deadline_s=10.0)
            return await operation(store)
        finally:
            await conn.close()

    # stdout carries only the command's output (the key); logs go to stderr, warnings only.
    saved = structlog.get_config()
    configure_logging("warning")
    try:
        return asyncio.run(main())
    except GatewayError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    finally:
        structlog.configure(**saved)  # leave an embedding process's logging as it was


def _limit(value: int | None) -> int | None:
    """CLI convention: option absent -> settings default; 0 -> unlimited."""
    if value is None:
        return DEFAULT  # type: ignore[no-any-return]
    return None if value == 0 else value


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    text = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise typer.BadParameter("expected an RFC 3339 time such as 2030-01-01T00:00:00Z")
    return parsed.astimezone(UTC)


LimitOpt = Annotated[int | None, typer.Option(min=0, help="0 = unlimited; absent = default")]


@app.command()
def create(
    name: Annotated[str, typer.Option(help="A label for the key")],
    rpm: LimitOpt = None,
    tpm: LimitOpt = None,
    max_concurrency: LimitOpt = None,
    models: Annotated[
        list[str] | None,
        typer.Option(help="Allowed model id (repeat, or comma-separate); absent = all models"),
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Policy name (absent = default)")] = None,
    expires_at: Annotated[
        str | None, typer.Option(help="RFC 3339 expiry, e.g. 2030-01-01T00:00:00Z")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Import this key (sk-..., e.g. from your records after Redis lost its data) "
            "instead of generating one; '-' reads it from stdin",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON")] = False,
) -> None:
    """Create a key and print it (shown only this once), or import a known key (--key) and
    print its id. Importing a key that is stored already fails (exit 1) naming its id."""
    allowed = [m.strip() for item in models or [] for m in item.split(",") if m.strip()]
    expiry = _time(expires_at)
    imported = _imported_key(key)

    async def op(store: KeyStore) -> tuple[ApiKey, str, bool]:
        return await store.create(
            name,
            rpm=_limit(rpm),
            tpm=_limit(tpm),
            max_concurrency=_limit(max_concurrency),
            models=allowed or None,
            policy=policy,
            expires_at=expiry,
            plain_key=imported,
        )

    record, plain, _ = _run(op)
    if imported is not None:
        # The operator has the key already: print the new id, never the key again.
        if as_json:
            typer.echo(json.dumps(record.public(), indent=2))
            return
        typer.echo(f"Imported {record.id} ({record.name}); {_limits(record)}.", err=True)
        typer.echo(record.id)
        return
    if as_json:
        typer.echo(json.dumps({**record.public(), "key": plain}, indent=2))
        return
    typer.echo(
        f"Created {record.id} ({record.name}); {_limits(record)}. Store the key now:", err=True
    )
    typer.echo(plain)


def _imported_key(value: str | None) -> str | None:
    """The --key value ('-': the first line of stdin), checked; never echoed in errors."""
    if value is None:
        return None
    plain = typer.get_text_stream("stdin").readline().strip() if value == "-" else value
    if problem := plain_key_problem(plain):
        raise typer.BadParameter(problem, param_hint="--key")
    return plain


@app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List keys (never their secrets)."""

    async def op(store: KeyStore) -> list[ApiKey]:
        return await store.list()

    keys = _run(op)
    if as_json:
        typer.echo(json.dumps({"object": "list", "data": [k.public() for k in keys]}, indent=2))
        return
    if not keys:
        typer.echo("no keys")
        return
    for k in keys:
        state = "disabled" if k.disabled else ("expired" if k.is_expired() else "active")
        models = ",".join(k.models) if k.models else "*"
        info: dict[str, Any] = {"name": k.name, "hint": k.hint, "state": state}
        typer.echo(
            f"{k.id}  "
            + "  ".join(f"{a}={b}" for a, b in info.items())
            + f"  {_limits(k)}  models={models}  policy={k.policy or 'default'}"
        )


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="The key id (key_...)")]) -> None:
    """Delete a key; every replica refuses it within 2 seconds."""

    async def op(store: KeyStore) -> bool:
        return await store.delete(key_id)

    if not _run(op):
        typer.echo(f"error: no API key with id '{key_id}'", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


def _limits(key: ApiKey) -> str:
    def show(v: int | None) -> str:
        return "unlimited" if v is None else str(v)

    return f"rpm={show(key.rpm)} tpm={show(key.tpm)} max_concurrency={show(key.max_concurrency)}"
