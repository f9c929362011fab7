"""PolicyStore: loads a directory, hot-reloads edits, keeps the last good version on errors."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from guards.policy_store import PolicyNotFound, PolicyStore

PROJECT_DEFAULT = (Path(__file__).resolve().parents[2] / "policies" / "default.yaml").read_text()

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def _text(version: str, name: str = "team") -> str:
    return (
        f"name: {name}\nversion: '{version}'\n"
        "guards:\n  blocklist: {stages: [input]}\n"
        "custom_blocklists:\n  - {name: canary, terms: [GATEWAY-CANARY-BLOCK], stage: input}\n"
    )


async def _eventually(check: Callable[[], bool], within: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_loads_the_shipped_policies() -> None:
    store = PolicyStore(POLICY_DIR)
    assert sorted(store.load()) == ["audit", "default", "strict"]
    assert store.names() == ["audit", "default", "strict"]
    assert store.get().name == "default"
    assert store.get("strict").name == "strict"
    assert "audit" in store and "nope" not in store
    assert store.ready() == (True, "ok")
    with pytest.raises(PolicyNotFound, match="no policy named 'nope'"):
        store.get("nope")
    rows = store.status()
    assert [r["name"] for r in rows] == ["audit", "default", "strict"]
    assert all(r["error"] is None and r["version"] == "1" and r["loaded_at"] for r in rows)
    assert rows[1]["file"] == str(POLICY_DIR / "default.yaml")
    # Nothing changed: nothing reloaded.
    assert store.load() == []


async def test_hot_reload_and_broken_edit(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "team.yaml"
    path.write_text(_text("1"))
    store = PolicyStore(tmp_path, default="team", metrics=registry, poll_interval_s=0.1)
    await store.start()
    try:
        first = store.get("team")
        assert first.version == "1"

        path.write_text(_text("2"))  # same size as before: detected by content, not mtime
        took = await _eventually(lambda: store.get("team").version == "2")
        assert took < 5.0
        assert first.version == "1"  # a request holding the old object keeps it whole

        path.write_text(_text("3") + "unknown_field: true\n")
        await _eventually(lambda: store.status()[0]["error"] is not None)
        (row,) = store.status()
        assert row["name"] == "team" and row["version"] == "2"
        assert "unknown_field" in row["error"] and ":7:" in row["error"]
        assert store.get("team").version == "2"  # the last good one is kept

        path.write_text("version: [\n")
        await _eventually(lambda: "(yaml)" in (store.status()[0]["error"] or ""))
        assert store.get("team").version == "2"

        path.write_text(_text("4"))
        await _eventually(lambda: store.get("team").version == "4")
        assert store.status()[0]["error"] is None
        assert registry.get_sample_value("gateway_policy_reloads_total", {"policy": "team"}) == 3
        assert (
            registry.get_sample_value("gateway_policy_reload_errors_total", {"file": str(path)})
            == 2
        )
    finally:
        await store.stop()
    assert store._task is None


async def test_new_file_appears_and_removed_file_is_kept(tmp_path: Path) -> None:
    shutil.copy(POLICY_DIR / "default.yaml", tmp_path / "default.yaml")
    store = PolicyStore(tmp_path, poll_interval_s=0.1)
    await store.start()
    try:
        (tmp_path / "extra.yaml").write_text(_text("7", name="extra"))
        await _eventually(lambda: "extra" in store)
        (tmp_path / "extra.yaml").unlink()
        await _eventually(lambda: any(r["error"] for r in store.status()))
        assert store.get("extra").version == "7"
        row = next(r for r in store.status() if r["name"] == "extra")
        assert "removed" in row["error"]
    finally:
        await store.stop()


def test_broken_file_at_start_is_reported(tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_text("version: 1\nguards:\n  nope: {stages: [input]}\n")
    (tmp_path / "ok.yaml").write_text(_text("1", name="ok"))
    (tmp_path / "notes.txt").write_text("ignored")
    store = PolicyStore(tmp_path)
    assert store.load() == ["ok"]
    ready, reason = store.ready()
    assert not ready
    assert "default policy 'default' is not loaded" in reason
    assert "guards.nope" in reason
    rows = {r["name"]: r for r in store.status()}
    assert rows["default"]["version"] is None and rows["default"]["loaded_at"] is None
    assert rows["default"]["error"].startswith(f"{tmp_path / 'default.yaml'}:3: guards.nope")
    assert set(rows) == {"default", "ok"}


def test_duplicate_policy_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(_text("1", name="same"))
    (tmp_path / "b.yaml").write_text(_text("2", name="same"))
    store = PolicyStore(tmp_path, default="same")
    store.load()
    assert store.get("same").version == "1"
    row = next(r for r in store.status() if r["file"].endswith("b.yaml"))
    assert "is already in" in row["error"]


def test_missing_directory(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "absent")
    assert store.load() == []
    ready, reason = store.ready()
    assert not ready
    assert reason.endswith(f"{tmp_path / 'absent'} is not a directory")


def test_a_renamed_policy_file_keeps_reloading(tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_text(PROJECT_DEFAULT)
    old = tmp_path / "mine.yaml"
    old.write_text(PROJECT_DEFAULT.replace("name: default", "name: mine"))
    store = PolicyStore(tmp_path)
    store.load()
    assert store.get("mine").version == "1"
    new = tmp_path / "mine-renamed.yaml"
    old.rename(new)
    store.load()
    assert store.get("mine").version == "1"
    new.write_text(new.read_text().replace('version: "1"', 'version: "2"'))
    store.load()
    assert store.get("mine").version == "2"
    entry = next(e for e in store.status() if e["name"] == "mine")
    assert entry["error"] is None


def test_a_file_that_crashes_the_parser_is_a_reported_broken_edit(tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_text(PROJECT_DEFAULT)
    store = PolicyStore(tmp_path)
    store.load()
    (tmp_path / "default.yaml").write_text("name: default\nversion: '2'\nguards: " + "[" * 5000)
    store.load()
    entry = next(e for e in store.status() if e["name"] == "default")
    assert entry["error"]
    assert entry["version"] == "1"  # the last good one is kept


def test_concurrent_loads_with_new_and_renamed_files_never_raise(tmp_path: Path) -> None:
    """The watcher thread and the admin save both run `load()`: with new files and renames
    between them, no call may fail (a dict changed size during iteration) or lose a policy."""
    import threading

    store = PolicyStore(tmp_path, metrics=CollectorRegistry())
    errors: list[BaseException] = []
    stop = threading.Event()

    def loader() -> None:
        while not stop.is_set():
            try:
                store.load()
            except BaseException as exc:  # recorded for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=loader) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(150):
            (tmp_path / f"p{i}.yaml").write_text(_text("1", name=f"p{i}"))
            if i % 3 == 0:
                (tmp_path / f"p{i}.yaml").rename(tmp_path / f"q{i}.yaml")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    store.load()
    assert len(store.names()) == 150
    assert all(row["error"] is None for row in store.status()), store.status()
