"""The Dockerfile, parse-checked (no Docker engine runs here): the two targets, pinned bases,
no build tools in the final stages, a non-root user, `gateway serve` on 0.0.0.0."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FINAL_TARGETS = ("cpu", "cuda")
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|[a-z0-9.]+-dev)\b")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, "a continuation line runs past the end of the file"
    return out


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = Stage(base=m.group(1), name=m.group(2))
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default.strip().strip('"')
        else:
            current.instructions.append((keyword, args))
    return global_args, stages


def resolve(ref: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], ref)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse((REPO_ROOT / "Dockerfile").read_text())


def test_stages_and_targets(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    assert set(FINAL_TARGETS) <= set(stages)
    assert len(stages) >= 3, "multi-stage: build stages plus the final targets"
    for target in FINAL_TARGETS:
        copies = stages[target].all("COPY")
        froms = [re.search(r"--from=(\S+)", c) for c in copies]
        sources = {m.group(1) for m in froms if m}
        assert sources and sources <= set(stages) - set(FINAL_TARGETS), (target, sources)


def test_base_images_are_pinned(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    args, stages = dockerfile
    bases = {s.name: resolve(s.base, args) for s in stages.values() if s.base not in stages}
    assert bases
    for stage, image in bases.items():
        name_and_tag, _, digest = image.partition("@")
        last = name_and_tag.rsplit("/", 1)[-1]
        assert ":" in last, f"{stage}: untagged base image {image}"
        tag = last.split(":", 1)[1]
        assert tag.lower() != "latest" and re.search(r"\d+\.\d+", tag), f"{stage}: {image}"
        assert not digest or re.fullmatch(r"sha256:[a-f0-9]{64}", digest)
    assert ":latest" not in (REPO_ROOT / "Dockerfile").read_text().lower()
    images = set(bases.values())
    assert any(i.startswith("nvidia/cuda:") for i in images)
    assert any(i.startswith("python:") and "slim" in i for i in images)


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_final_stage_runs_gateway_serve_as_non_root(
    dockerfile: tuple[dict[str, str], dict[str, Stage]], target: str
) -> None:
    _, stages = dockerfile
    stage = stages[target]
    users = stage.all("USER")
    assert users, f"{target}: no USER"
    last_user = users[-1].split(":")[0]
    assert last_user not in ("root", "0"), target
    # USER comes after every RUN, so nothing later runs as root.
    keywords = [kw for kw, _ in stage.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    (entrypoint,) = stage.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["gateway", "serve"], "exec form, gateway serve"
    assert not stage.all("CMD")
    env = " ".join(stage.all("ENV"))
    assert re.search(r"\bGATEWAY_HOST=0\.0\.0\.0\b", env)
    assert re.search(r"\bGATEWAY_PORT=8000\b", env)
    assert "8000" in stage.all("EXPOSE")


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_no_build_tools_in_final_stage(
    dockerfile: tuple[dict[str, str], dict[str, Stage]], target: str
) -> None:
    _, stages = dockerfile
    for run in stages[target].all("RUN"):
        for part in re.split(r"&&|;", run):
            words = shlex.split(part.replace("\\", " "))
            if "install" in words and ("apt-get" in words or "apt" in words):
                packages = [
                    w
                    for w in words
                    if not w.startswith("-") and w not in {"apt-get", "apt", "install"}
                ]
                assert not [p for p in packages if BUILD_TOOLS.fullmatch(p)], (target, packages)
            assert "pip" not in words, f"{target}: installs Python packages in the final stage"


def test_build_stages_install_the_right_torch(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    args, stages = dockerfile
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    cpu_build = " ".join(stages["cpu-build"].all("RUN"))
    assert "TORCH_CPU_INDEX_URL" in cpu_build and args["TORCH_CPU_INDEX_URL"].endswith("/cpu")
    assert "torch==${TORCH_VERSION}" in " ".join(stages["cuda-build"].all("RUN"))


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    patterns = [
        p.strip()
        for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for ignored in (".git", ".venv", ".env", "tests", "helm"):
        assert any(fnmatch.fnmatch(ignored, p) for p in patterns), ignored
    for needed in ("pyproject.toml", "README.md", "gateway", "guards", "model", "policies"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), needed
