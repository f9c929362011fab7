"""The `gateway` command: serve, build the demo model, and the sub-commands of other modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gateway.audit_cli import app as audit_app
from gateway.keys_cli import app as keys_app
from gateway.settings import Settings
from guards.policy_cli import policy_app

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
cli.add_typer(keys_app, name="keys", help="Manage API keys (same Redis as the server).")
cli.add_typer(policy_app, name="policy", help="Check and evaluate safety policies.")
cli.add_typer(audit_app, name="audit", help="Read the audit log of guard decisions.")


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (GATEWAY_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (GATEWAY_PORT)")] = None,
) -> None:
    """Start the gateway (the demo model when GATEWAY_MODEL_PATH is unset)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.http_server import CoalescingHttpToolsProtocol

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = Settings(**overrides)  # type: ignore[arg-type]
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        http=CoalescingHttpToolsProtocol,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


@cli.command("demo-model")
def demo_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the demo model into")],
    seed: Annotated[int, typer.Option(help="Random seed for the weights")] = 0,
) -> None:
    """Write the tiny random Llama 3.2-Vision-architecture demo model (save_pretrained)."""
    from model.demo_model import build_demo_model

    path = build_demo_model(out_dir, seed=seed)
    typer.echo(str(path))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()


if __name__ == "__main__":
    main()
