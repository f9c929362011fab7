"""`gateway audit tail [--follow]`: the audit log of guard decisions from the command line.

Reads the same Redis stream as `GET /admin/audit` (GATEWAY_REDIS_URL or GATEWAY_AUDIT_REDIS_URL,
the same key prefix), with the same filters. Prints the last `--limit` matching entries oldest
first, one per line (`--json`: the entries as JSON lines); `--follow` then prints new ones as they
arrive, until interrupted.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import structlog
import typer

from gateway.audit import AuditFilter, AuditLog, decode_entry
from gateway.audit_api import parse_time_ms
from gateway.errors import GatewayError
from gateway.logging import configure_logging
from gateway.redis_conn import RedisConnection, make_client
from gateway.settings import Settings

app = typer.Typer(help="Read the audit log of guard decisions.", no_args_is_help=True)


def format_entry(entry: dict[str, Any]) -> str:
    """One line: time, action, stage, policy@version, key, categories, deciding guards."""
    categories = ",".join(
        f"{name}({c.get('severity') or c.get('action')})"
        for name, c in entry.get("categories", {}).items()
    )
    return (
        f"{entry.get('time')} {entry.get('action'):9} {entry.get('stage'):6} "
        f"{entry.get('policy')}@{entry.get('policy_version')} key={entry.get('key_name')} "
        f"req={entry.get('request_id')} [{categories}] by={','.join(entry.get('decided_by', []))}"
    )


@app.command()
def tail(
    since: Annotated[str | None, typer.Option(help="RFC 3339 time or Unix seconds")] = None,
    until: Annotated[str | None, typer.Option(help="RFC 3339 time or Unix seconds")] = None,
    key: Annotated[str | None, typer.Option(help="API key id or name")] = None,
    policy: Annotated[str | None, typer.Option(help="Policy name")] = None,
    category: Annotated[str | None, typer.Option(help="e.g. jailbreak, blocklist:canary")] = None,
    action: Annotated[str | None, typer.Option(help="blocked or annotated")] = None,
    stage: Annotated[str | None, typer.Option(help="input or output")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many to show")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """Show the most recent audit entries (and with --follow, new ones as they come)."""
    try:
        where = AuditFilter(
            since_ms=parse_time_ms(since, "since"),
            until_ms=parse_time_ms(until, "until"),
            key=key,
            policy=policy,
            category=category,
            action=action,
            stage=stage,
        )
    except GatewayError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    show = (lambda e: json.dumps(e)) if as_json else format_entry
    saved = structlog.get_config()
    configure_logging("warning")
    try:
        asyncio.run(_tail(where, limit, follow, show))
    except KeyboardInterrupt:
        pass
    finally:
        structlog.configure(**saved)


async def _tail(where: AuditFilter, limit: int, follow: bool, show: Any) -> None:
    settings = Settings()
    conn = await RedisConnection.open(
        settings, connect_timeout_s=5.0, socket_timeout_s=5.0, deadline_s=10.0
    )
    client = conn.client
    if settings.audit_redis_url is not None:
        client = make_client(settings.audit_redis_url, connect_timeout_s=5, socket_timeout_s=5)
    try:
        log = AuditLog(client, f"{settings.redis_key_prefix}:audit")
        entries, _ = await log.query(where, limit=limit)
        for entry in reversed(entries):
            typer.echo(show(entry))
        last = entries[0]["id"] if entries else "$"
        while follow:
            rows: Any = await client.xread({log.stream_key: last}, count=100, block=1000)
            for _, messages in rows or []:
                for entry_id, fields in messages:
                    last = str(entry_id)
                    entry = decode_entry(last, fields)
                    if entry is not None and where.matches(entry):
                        typer.echo(show(entry))
    finally:
        if client is not conn.client:
            await client.aclose()
        await conn.close()
