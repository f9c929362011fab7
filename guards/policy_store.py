"""The loaded policies, reloaded from their directory while the gateway runs.

`PolicyStore(directory)` loads every `*.yaml` file there (`load()`); `get(name)` returns the
current version of a policy. `start()` runs a watcher task that polls the files every
`poll_interval_s` (1 s by default) and swaps a changed policy in atomically (one dict
assignment; a request keeps the `Policy` object it got). A broken edit keeps the last good
version and records the error (`status()`, the log, `gateway_policy_reload_errors_total`); a file
that is removed also keeps its last good version, with an error saying so, so that keys naming
it keep working until a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from guards.pipeline import GuardMetrics
from guards.policy import Policy
from guards.policy_loader import PolicyError, load_policy_bytes

log = structlog.get_logger("guards.policy_store")


class PolicyNotFound(KeyError):
    """No policy of that name is loaded."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no policy named {self.name!r} is loaded"


@dataclass
class _Entry:
    file: Path
    digest: str | None = None
    policy: Policy | None = None
    loaded_at: datetime | None = None
    error: str | None = None


class PolicyStore:
    def __init__(
        self,
        directory: str | Path,
        *,
        default: str = "default",
        metrics: CollectorRegistry | GuardMetrics | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.default = default
        self.metrics = GuardMetrics.on(metrics)
        self.poll_interval_s = poll_interval_s
        self._entries: dict[Path, _Entry] = {}
        self._by_name: dict[str, Policy] = {}
        self._task: asyncio.Task[None] | None = None
        # `load` runs in worker threads (the watcher, and an admin save reloading at once):
        # one at a time, since each mutates `_entries`.
        self._load_lock = threading.Lock()
        self.directory_error: str | None = None

    # -- reading ---------------------------------------------------------------------------

    def get(self, name: str | None = None) -> Policy:
        """The current version of a policy (the default one when `name` is None)."""
        key = name or self.default
        policy = self._by_name.get(key)
        if policy is None:
            raise PolicyNotFound(key)
        return policy

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[Policy]:
        return iter(list(self._by_name.values()))

    def status(self) -> list[dict[str, Any]]:
        """One row per policy file, for `GET /admin/policies`."""
        rows = []
        for entry in sorted(list(self._entries.values()), key=lambda e: e.file.name):
            policy = entry.policy
            rows.append(
                {
                    "name": policy.name if policy is not None else entry.file.stem,
                    "version": policy.version if policy is not None else None,
                    "file": str(entry.file),
                    "loaded_at": entry.loaded_at.isoformat() if entry.loaded_at else None,
                    "error": entry.error,
                }
            )
        return rows

    def ready(self) -> tuple[bool, str]:
        """For `/readyz`: the default policy must be loaded."""
        if self.default in self._by_name:
            return True, "ok"
        detail = self.directory_error or next(
            (
                e.error
                for e in list(self._entries.values())
                if e.file.stem == self.default and e.error
            ),
            None,
        )
        reason = f"default policy {self.default!r} is not loaded"
        return False, f"{reason}: {detail}" if detail else reason

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> list[str]:
        """Load or reload what changed; returns the names of policies (re)loaded. Never raises
        for a bad file (the error is recorded). Thread-safe: concurrent calls run one by one."""
        with self._load_lock:
            return self._load()

    def _load(self) -> list[str]:
        if not self.directory.is_dir():
            self.directory_error = f"{self.directory} is not a directory"
            log.error("policy_dir_missing", directory=str(self.directory))
            return []
        try:
            files = sorted(p for p in self.directory.glob("*.yaml") if p.is_file())
            self.directory_error = None
        except OSError as exc:
            self.directory_error = f"cannot list {self.directory}: {exc}"
            log.error("policy_dir_unreadable", directory=str(self.directory), error=str(exc))
            return []
        changed: list[str] = []
        seen = set(files)
        # Removals first: a removed file keeps serving its last good policy (until another file
        # takes the name, as in a rename) and is reported.
        for path, entry in list(self._entries.items()):
            if path not in seen and entry.policy is None:
                # Gone before it ever loaded (e.g. renamed while being read): nothing to keep.
                del self._entries[path]
                continue
            if path not in seen and entry.digest is not None:
                entry.digest = None
                self._fail(entry, f"{path}: the file was removed; keeping the last good version")
        for path in files:
            entry = self._entries.setdefault(path, _Entry(file=path))
            try:
                raw = path.read_bytes()
            except OSError as exc:
                self._fail(entry, f"cannot read: {exc.strerror or exc}")
                continue
            digest = hashlib.sha256(raw).hexdigest()
            if digest == entry.digest:
                continue
            entry.digest = digest
            try:
                policy = load_policy_bytes(raw, path)
            except PolicyError as exc:
                self._fail(entry, str(exc))
                continue
            except Exception as exc:  # e.g. RecursionError on absurd nesting: still a bad edit
                self._fail(entry, f"{path}: cannot load: {type(exc).__name__}: {exc}")
                continue
            clash = next(
                (
                    other
                    for other in self._entries.values()
                    if other is not entry
                    and other.policy is not None
                    and other.policy.name == policy.name
                ),
                None,
            )
            if clash is not None and clash.file not in seen:
                # The name's file was removed (a rename): the new file takes it over.
                del self._entries[clash.file]
            elif clash is not None:
                # Depends on another file, so retry on the next pass (do not remember the hash).
                entry.digest = None
                self._fail(
                    entry, f"{path}: name: policy {policy.name!r} is already in {clash.file}"
                )
                continue
            entry.policy = policy
            entry.loaded_at = datetime.now(UTC)
            entry.error = None
            changed.append(policy.name or path.stem)
            self.metrics.reloads.labels(policy.name or path.stem).inc()
            log.info("policy_loaded", policy=policy.name, version=policy.version, file=str(path))
        self._publish()
        return changed

    def _fail(self, entry: _Entry, message: str) -> None:
        entry.error = message
        self.metrics.reload_errors.labels(str(entry.file)).inc()
        log.error(
            "policy_load_failed",
            file=str(entry.file),
            error=message,
            keeping=entry.policy.version if entry.policy is not None else None,
        )

    def _publish(self) -> None:
        by_name: dict[str, Policy] = {}
        for entry in self._entries.values():
            if entry.policy is not None and entry.policy.name is not None:
                by_name[entry.policy.name] = entry.policy
        self._by_name = by_name  # one assignment: readers see the old or the new dict

    # -- watching --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load now, then watch the directory until `stop()`."""
        await asyncio.to_thread(self.load)
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="policy-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await asyncio.to_thread(self.load)
            except Exception as exc:  # the watcher must survive anything
                log.error("policy_watch_failed", error=str(exc))
