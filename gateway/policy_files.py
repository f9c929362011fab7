"""Reading and saving policy files for the workbench: validation with lines, atomic writes,
optimistic concurrency and read-only directories.

- `etag(raw)`: the version of a file's bytes that an editor read; a save sends it back, and a
  save whose etag no longer matches the file gets `PolicyConflict` (409), never a silent
  overwrite. A new policy is saved with etag null (and conflicts if the file appeared).
- `save(...)` writes a temp file in the same directory, fsyncs it and renames it over the
  target (readers and the hot reload see the old file or the new one, never half of one), under
  an exclusive `flock` on the directory so that two saves (or two replicas sharing a volume)
  cannot interleave their check and rename.
- A directory that cannot be written (a Kubernetes ConfigMap is mounted read-only) gets
  `PolicyDirReadOnly` (403) with what to do instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import InvalidRequest, PolicyConflict, PolicyDirReadOnly
from guards.policy import Policy
from guards.policy_loader import PolicyError, parse_policy

READ_ONLY_HINT = (
    "Edit the policy where it comes from instead (Git, then the Helm chart's ConfigMap); "
    "the workbench can still validate and try drafts."
)


def etag(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:32]


def issues_of(exc: PolicyError) -> list[dict[str, Any]]:
    """The errors `gateway policy check` prints, as data: line, field, message."""
    return [{"line": i.line, "field": i.field, "message": i.message} for i in exc.issues]


def validate(text: str, file_name: str) -> Policy:
    """Parse a draft; invalid -> 400 with `errors` (one per problem, with its line)."""
    try:
        return parse_policy(text, file=file_name, stem=Path(file_name).stem)
    except PolicyError as exc:
        raise InvalidRequest(
            f"The policy is not valid: {exc.issues[0]}",
            param="yaml",
            code="invalid_policy",
            extra={"errors": issues_of(exc)},
        ) from None


def writable_problem(directory: Path) -> str | None:
    """Why saving into `directory` is impossible, or None."""
    if not directory.is_dir():
        return f"The policy directory {directory} does not exist."
    if not os.access(directory, os.W_OK):
        return f"The policy directory {directory} is read-only. {READ_ONLY_HINT}"
    return None


@dataclass(frozen=True)
class Source:
    file: Path
    text: str
    etag: str | None  # None: no such file yet


def read_source(file: Path) -> Source:
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return Source(file, "", None)
    return Source(file, raw.decode("utf-8", errors="replace"), etag(raw))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def save(file: Path, text: str, expected_etag: str | None) -> str:
    """Write `text` to `file` atomically if it still has `expected_etag`; returns the new etag.
    Blocking (file I/O): call it from a worker thread."""
    directory = file.parent
    problem = writable_problem(directory)
    if problem is not None:
        raise PolicyDirReadOnly(problem)
    raw = text.encode("utf-8")
    try:
        with _locked(directory):
            current = read_source(file).etag
            if current != expected_etag:
                raise PolicyConflict(
                    "The policy file changed since you opened it (someone else saved it, or "
                    "it was edited on disk). Reload it, re-apply your edit and save again.",
                    param="etag",
                    extra={"current_etag": current},
                )
            fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(raw)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, file)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise PolicyDirReadOnly(
                f"The policy directory {directory} cannot be written ({exc.strerror}). "
                f"{READ_ONLY_HINT}"
            ) from None
        raise
    return etag(raw)
