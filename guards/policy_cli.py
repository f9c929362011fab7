"""`gateway policy ...`: check policy files, and measure a policy's embedded guards.

- `check FILE...`: validates each file; prints `file:line: field: message` per problem on
  stderr and exits 1 when any file has one.
- `eval --policy P --data FILE.jsonl [--stage input|output]`: runs a labelled set through the
  policy's embedded guards (blocklist, profanity, jailbreak_heuristic) and prints per category
  precision, recall and false-positive rate, and the guards' latency (p50, p99). Guards that
  need weights (prompt_guard, llama_guard) run when their paths are configured, else skipped.

A data line is `{"text": ..., "expected": ["jailbreak", ...], "image": optional path (relative
to the data file) or data URL, "stage": optional "input"|"output", "prompt": optional prompt for
an output line, "role": optional "system"|"assistant" to plant the text in that turn before a
neutral user question}`. Expected labels are category keys: `hate`, `self_harm`, `sexual`,
`violence`, `jailbreak`, `indirect_attack`, `profanity`, `S1`..`S14`, `blocklist:<name>`. A
category counts as predicted when it crossed the policy's threshold (blocked or annotated).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from guards.base import Guard, GuardInput, Stage
from guards.policy import CATEGORY_NAMES, Policy
from guards.policy_loader import PolicyError, load_policy
from model.engine import ChatTurn, ImagePart, TextPart

policy_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Check and evaluate policy files."
)

NEUTRAL_QUESTION = "Please answer my question about the text above."
WEIGHT_GUARDS = {
    "prompt_guard": "GATEWAY_PROMPT_GUARD_PATH",
    "llama_guard": "GATEWAY_LLAMA_GUARD_PATH",
}


@policy_app.command()
def check(
    files: Annotated[list[Path], typer.Argument(help="Policy files to validate")],
) -> None:
    """Validate policy files; exit 1 with file:line: field: message on any error."""
    failed = False
    for path in files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            failed = True
            for issue in exc.issues:
                typer.echo(str(issue), err=True)
            continue
        typer.echo(f"{path}: ok (policy {policy.name!r}, version {policy.version})")
    if failed:
        raise typer.Exit(1)


# -- eval ----------------------------------------------------------------------------------


class DataError(ValueError):
    """A line of the labelled data set is malformed."""


@dataclass
class EvalLine:
    text: str
    expected: set[str]
    stage: Stage
    image: str | None = None
    prompt: str | None = None
    role: str = "user"
    line: int = 0


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, expected: bool, predicted: bool) -> None:
        if expected and predicted:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif expected:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def fpr(self) -> float | None:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else None


@dataclass
class EvalReport:
    policy: str
    lines: int
    counts: dict[str, Counts]
    latencies_ms: dict[str, list[float]]
    skipped: list[str]
    mistakes: list[str] = field(default_factory=list)
    blocked: int = 0


def read_data(path: Path, default_stage: Stage) -> list[EvalLine]:
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{number}: needs a string field 'text'")
        expected = obj.get("expected", [])
        if not isinstance(expected, list) or not all(isinstance(e, str) for e in expected):
            raise DataError(f"{path}:{number}: 'expected' must be a list of strings")
        unknown = [
            e for e in expected if e not in CATEGORY_NAMES and not e.startswith("blocklist:")
        ]
        if unknown:
            raise DataError(f"{path}:{number}: unknown labels {unknown}")
        stage = obj.get("stage", default_stage)
        if stage not in ("input", "output"):
            raise DataError(f"{path}:{number}: stage must be input or output")
        for name in ("image", "prompt"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise DataError(f"{path}:{number}: '{name}' must be a string")
        role = obj.get("role", "user")
        if role not in ("user", "system", "assistant"):
            raise DataError(f"{path}:{number}: role must be user, system or assistant")
        out.append(
            EvalLine(
                text=obj["text"],
                expected=set(expected),
                stage=stage,
                image=obj.get("image"),
                prompt=obj.get("prompt"),
                role=role,
                line=number,
            )
        )
    return out


def _load_image(ref: str, base: Path) -> Any:
    from PIL import Image

    if ref.startswith("data:"):
        data = base64.b64decode(ref.split(",", 1)[1])
        return Image.open(io.BytesIO(data)).convert("RGB")
    return Image.open(base / ref).convert("RGB")


def _guard_input(line: EvalLine, base: Path) -> GuardInput:
    """For the CLI: an `image` is a data: URL or a path relative to the data file's folder."""
    return guard_input(line, _load_image(line.image, base) if line.image else None)


def guard_input(line: EvalLine, image: Any | None) -> GuardInput:
    """The guards' input for one labelled line, with its image already loaded (or None)."""
    parts: list[TextPart | ImagePart] = []
    if image is not None:
        parts.append(ImagePart(image))
    if line.stage == "output":
        messages = (ChatTurn("user", (*parts, TextPart(line.prompt or ""))),)
        return GuardInput(stage="output", messages=messages, completion=line.text)
    if line.role != "user":
        # Planted text: a system prompt or an assistant turn, then a plain user question.
        planted = ChatTurn(line.role, (TextPart(line.text),))  # type: ignore[arg-type]
        user = ChatTurn("user", (*parts, TextPart(NEUTRAL_QUESTION)))
        return GuardInput(stage="input", messages=(planted, user))
    return GuardInput(stage="input", messages=(ChatTurn("user", (*parts, TextPart(line.text))),))


def configured_guards() -> dict[str, Guard]:
    """The embedded guards, plus Prompt Guard / Llama Guard when their weights are configured
    (GATEWAY_PROMPT_GUARD_PATH, GATEWAY_LLAMA_GUARD_PATH), exactly as the gateway builds them."""
    from guards.registry import build_guards

    paths = {name: os.environ.get(env) for name, env in WEIGHT_GUARDS.items()}
    return build_guards(
        prompt_guard_path=Path(p) if (p := paths["prompt_guard"]) else None,
        llama_guard_path=Path(p) if (p := paths["llama_guard"]) else None,
        device=os.environ.get("GATEWAY_DEVICE", "auto"),
    )


def _without_missing_guards(policy: Policy, available: Sequence[str]) -> Policy:
    """The same policy with unconfigured weight-needing guards optional (so they are skipped)."""
    guards = {
        name: settings.model_copy(update={"optional": True})
        if name in WEIGHT_GUARDS and name not in available
        else settings
        for name, settings in policy.guards.items()
    }
    return policy.model_copy(update={"guards": guards})


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def run_eval(policy: Policy, lines: Sequence[EvalLine], base: Path) -> EvalReport:
    from guards.pipeline import GuardPipeline

    guards = configured_guards()
    policy = _without_missing_guards(policy, list(guards))
    pipeline = GuardPipeline(policy, guards)
    skipped = sorted(set(pipeline.skipped("input")) | set(pipeline.skipped("output")))
    # Warm-up (first calls pay for imports and caches), not measured.
    await pipeline.run("input", [_guard_input(EvalLine("warm up", set(), "input"), base)])
    labels = list(CATEGORY_NAMES)
    extra = sorted({e for line in lines for e in line.expected} - set(labels))
    counts: dict[str, Counts] = {}
    latencies: dict[str, list[float]] = {}
    mistakes: list[str] = []
    predictions: list[set[str]] = []
    blocked = 0
    for line in lines:
        item = _guard_input(line, base)
        started = time.perf_counter()
        (decision,) = await pipeline.run(line.stage, [item])
        latencies.setdefault("(all guards)", []).append((time.perf_counter() - started) * 1000)
        for guard, seconds in decision.latencies.items():
            latencies.setdefault(guard, []).append(seconds * 1000)
        predicted = set(decision.hits)
        predictions.append(predicted)
        blocked += decision.blocked
        if predicted != line.expected:
            mistakes.append(
                f"line {line.line}: expected {sorted(line.expected)} got {sorted(predicted)}: "
                f"{line.text[:70]!r}"
            )
    seen = {c for p in predictions for c in p} | {e for line in lines for e in line.expected}
    for category in [*labels, *extra, *sorted(seen - set(labels) - set(extra))]:
        if category not in seen:
            continue
        tally = counts.setdefault(category, Counts())
        for line, predicted in zip(lines, predictions, strict=True):
            tally.add(category in line.expected, category in predicted)
    overall = counts.setdefault("(any)", Counts())
    for line, predicted in zip(lines, predictions, strict=True):
        overall.add(bool(line.expected), bool(predicted))
    return EvalReport(
        policy=policy.name or "",
        lines=len(lines),
        counts=counts,
        latencies_ms=latencies,
        skipped=skipped,
        mistakes=mistakes,
        blocked=blocked,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_report(report: EvalReport) -> str:
    out = [
        f"policy {report.policy!r}: {report.lines} lines, {report.blocked} blocked",
        "",
        "| category | positives | TP | FP | FN | precision | recall | FPR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for category, c in report.counts.items():
        out.append(
            f"| {category} | {c.tp + c.fn} | {c.tp} | {c.fp} | {c.fn} | {_fmt(c.precision)} "
            f"| {_fmt(c.recall)} | {_fmt(c.fpr)} |"
        )
    out += ["", "| guard | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
    for guard, values in sorted(report.latencies_ms.items()):
        out.append(f"| {guard} | {percentile(values, 50):.2f} | {percentile(values, 99):.2f} |")
    if report.skipped:
        needs = ", ".join(f"{g} ({WEIGHT_GUARDS.get(g, 'not available')})" for g in report.skipped)
        out += ["", f"skipped (need weights; set the variable to run them): {needs}"]
    return "\n".join(out)


def _resolve_policy(ref: str) -> Policy:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_policy(path)
    import os

    directory = Path(os.environ.get("GATEWAY_POLICY_DIR", "") or _default_policy_dir())
    for candidate in sorted(directory.glob("*.yaml")):
        try:
            policy = load_policy(candidate)
        except PolicyError:
            continue
        if policy.name == ref:
            return policy
    raise typer.BadParameter(f"no policy file or policy named {ref!r} in {directory}")


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """Guard logs (skipped guards, failures) go to stderr at warning level while eval prints
    its report on stdout; the previous logging configuration is restored afterwards."""
    import structlog

    previous = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**previous)


def _default_policy_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "policies"


@policy_app.command("eval")
def eval_command(
    policy: Annotated[str, typer.Option("--policy", help="A policy file, or a policy name")],
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL file")],
    stage: Annotated[
        str, typer.Option("--stage", help="Stage for lines without one: input or output")
    ] = "input",
    show_mistakes: Annotated[
        bool, typer.Option("--show-mistakes", help="List the lines the guards got wrong")
    ] = False,
) -> None:
    """Run a labelled set through a policy's embedded guards; print precision, recall, FPR
    per category and the guards' latency."""
    if stage not in ("input", "output"):
        raise typer.BadParameter("--stage must be input or output")
    try:
        resolved = _resolve_policy(policy)
    except PolicyError as exc:
        for issue in exc.issues:
            typer.echo(str(issue), err=True)
        raise typer.Exit(1) from None
    try:
        lines = read_data(data, stage)  # type: ignore[arg-type]
    except (OSError, DataError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if not lines:
        typer.echo(f"{data}: no data lines", err=True)
        raise typer.Exit(1)
    with _logs_to_stderr():
        report = asyncio.run(run_eval(resolved, lines, data.parent))
    typer.echo(format_report(report))
    if show_mistakes and report.mistakes:
        typer.echo("")
        typer.echo("\n".join(report.mistakes))
