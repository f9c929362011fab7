"""The secret that API keys are hashed with, and private (0600) state files.

Every replica and the CLI must hash with the same secret: `GATEWAY_KEY_SECRET`, or the one
generated once into the shared state directory.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from gateway.settings import Settings

log = structlog.get_logger(__name__)

SECRET_FILE = "key_secret"


def load_key_secret(settings: Settings) -> bytes:
    """`GATEWAY_KEY_SECRET`, else `<state_dir>/key_secret`, created once with mode 0600.

    Every replica and the CLI must hash with the same secret: set GATEWAY_KEY_SECRET (or share
    the state directory) in multi-replica deployments.
    """
    configured = settings.key_secret
    if configured:
        if len(configured) < 16:
            log.warning("GATEWAY_KEY_SECRET is short; use at least 32 random characters")
        return configured.encode()
    path = settings.state_dir / SECRET_FILE
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
