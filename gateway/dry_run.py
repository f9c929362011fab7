"""What the API would answer under a policy, without generating: the workbench's "Try" and
`POST /admin/policies/dry-run`, and its "Evaluate" (a labelled JSONL, draft vs saved).

The policy's guards run exactly as on the request path (the same guard objects, bound to the
policy the same way), each wrapped so that its own verdict (scores per category, latency,
error) is reported next to the decision. Dry runs count in no production metric.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from gateway.errors import GatewayError, InvalidRequest
from gateway.images import ImageLoader
from guards.base import Guard, GuardInput, GuardVerdict, Stage
from guards.blocklist import BlocklistGuard
from guards.coverage import stage_coverage
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.policy import Policy
from guards.policy_cli import Counts, DataError, EvalLine, guard_input, read_data
from model.engine import ChatTurn, ImagePart, TextPart


class _Recording(Guard):
    """A guard that remembers the verdicts it returned (one dry run, one task)."""

    def __init__(self, guard: Guard) -> None:
        self.inner = guard
        self.name = guard.name
        self.stages = guard.stages
        self.verdicts: list[GuardVerdict] = []

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        verdicts = await self.inner.check(items)
        self.verdicts.extend(verdicts)
        return verdicts


def bound_guards(policy: Policy, guards: Mapping[str, Guard]) -> dict[str, _Recording]:
    bound: dict[str, _Recording] = {}
    for name, guard in guards.items():
        bound[name] = _Recording(guard.for_policy(policy))
    if "blocklist" not in bound:
        bound["blocklist"] = _Recording(BlocklistGuard.from_policy(policy))
    return bound


def judged_categories(policy: Policy, guards: Mapping[str, Guard]) -> list[str]:
    """The result keys that some guard of this policy, as loaded here, really judges (at either
    stage; the same coverage rule as the start-up log and `/admin/policies`)."""
    judged = stage_coverage(policy, guards, "input") | stage_coverage(policy, guards, "output")
    if policy.custom_blocklists:
        judged.add("custom_blocklists")
    return sorted(judged)


def _verdict_json(verdict: GuardVerdict, stage: Stage) -> dict[str, Any]:
    return {
        "guard": verdict.guard,
        "stage": stage,
        "latency_ms": round(verdict.latency_s * 1000, 3),
        "error": verdict.error,
        "categories": {
            key: {"score": round(c.score, 4), "severity": c.severity, "detected": c.detected}
            for key, c in verdict.categories.items()
        },
    }


def _decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "blocked": decision.blocked,
        "hits": decision.hits,
        "reasons": decision.reasons,
        "decided_by": decision.deciders(),  # the audit log's rule (failures that blocked too)
        "guard_errors": decision.errors,
        "skipped_guards": decision.skipped,
    }


async def dry_run(
    policy: Policy,
    guards: Mapping[str, Guard],
    prompt: str,
    image: Image.Image | None = None,
    answer: str | None = None,
) -> dict[str, Any]:
    """The would-be API answer and every guard's verdict, for one policy."""
    recorders = bound_guards(policy, guards)
    pipeline = GuardPipeline(policy, recorders, quiet=True)
    parts: tuple[TextPart | ImagePart, ...] = (TextPart(prompt),)
    if image is not None:
        parts = (ImagePart(image), TextPart(prompt))
    turns = (ChatTurn("user", parts),)
    (inp,) = await pipeline.run("input", [GuardInput("input", turns)])
    verdicts = [_verdict_json(v, "input") for r in recorders.values() for v in r.verdicts]
    out: Decision | None = None
    if inp.blocked:
        response: dict[str, Any] = {"status": 400, "body": inp.error_body()}
    else:
        response = {"status": 200, "prompt_filter_results": inp.prompt_filter_results()}
        if answer is not None:
            for r in recorders.values():
                r.verdicts.clear()
            item = GuardInput("output", turns, completion=answer)
            (out,) = await pipeline.run("output", [item])
            verdicts += [_verdict_json(v, "output") for r in recorders.values() for v in r.verdicts]
            response["choices"] = [
                {
                    "index": 0,
                    "finish_reason": "content_filter" if out.blocked else "stop",
                    "content_filter_results": out.content_filter_results(),
                }
            ]
    return {
        "policy": {"name": policy.name, "version": policy.version},
        "response": response,
        "input": _decision_json(inp),
        "output": _decision_json(out) if out is not None else None,
        "guards": verdicts,
        "skipped_guards": sorted(set(pipeline.skipped("input")) | set(pipeline.skipped("output"))),
    }


def difference(saved: dict[str, Any], draft: dict[str, Any]) -> dict[str, Any]:
    """What the draft decides differently from the saved policy."""
    changes: list[dict[str, Any]] = []
    for stage in ("input", "output"):
        a, b = saved.get(stage) or {}, draft.get(stage) or {}
        if not a and not b:
            continue
        if a.get("blocked") != b.get("blocked"):
            changes.append(
                {
                    "stage": stage,
                    "what": "blocked",
                    "saved": a.get("blocked"),
                    "draft": b.get("blocked"),
                }
            )
        hits_a, hits_b = a.get("hits", {}), b.get("hits", {})
        for category in sorted(set(hits_a) | set(hits_b)):
            if hits_a.get(category) != hits_b.get(category):
                changes.append(
                    {
                        "stage": stage,
                        "what": category,
                        "saved": hits_a.get(category),
                        "draft": hits_b.get(category),
                    }
                )
    return {
        "status": {"saved": saved["response"]["status"], "draft": draft["response"]["status"]},
        "changes": changes,
    }


# -- evaluate ----------------------------------------------------------------------------------


def parse_jsonl(text: str) -> list[EvalLine]:
    """The bench/guard_eval format (one JSON object per line: text, expected, stage, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.jsonl"
        path.write_text(text, encoding="utf-8")
        try:
            return read_data(path, "input")
        except DataError as exc:
            raise ValueError(str(exc).replace(str(path), "line")) from None


async def load_images(
    lines: Sequence[EvalLine], loader: ImageLoader, datasets_dir: Path
) -> dict[int, Image.Image]:
    """The images of uploaded lines, by line number. An upload may name only a `data:` image
    (through the app's image limits) or a file inside the shipped data sets' folder: never any
    other path on the server. A bad image is a 400 naming its line."""
    root = datasets_dir.resolve()
    images: dict[int, Image.Image] = {}
    for line in lines:
        ref = line.image
        if ref is None or ref == "":
            continue
        if not isinstance(ref, str):
            raise InvalidRequest(f"line {line.line}: 'image' must be a string.", param="jsonl")
        try:
            if ref[:5].lower() == "data:":
                images[line.line] = await loader.load(ref)
                continue
            data = await asyncio.to_thread(_shipped_file, root, ref)
            if data is None:
                raise InvalidRequest(
                    f"line {line.line}: 'image' must be a data: URL or the name of an image "
                    "shipped with the data sets.",
                    param="jsonl",
                )
            images[line.line] = await loader.decode(data)
        except GatewayError as exc:
            raise InvalidRequest(
                f"line {line.line}: image: {exc.message}", param="jsonl", code=exc.code
            ) from None
    return images


def _shipped_file(root: Path, ref: str) -> bytes | None:
    """The bytes of `ref` when it is a file under `root` (None for anything else)."""
    try:
        path = (root / ref).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path.read_bytes()
    except (OSError, ValueError):
        return None


# Evaluate runs its lines through the production guard objects: in batches (one guard call
# per batch), a few batches at a time, so that a 2,000-line upload neither queues line by line
# nor floods the guards' batchers ahead of live traffic.
EVAL_BATCH = 16
EVAL_CONCURRENCY = 2


async def predictions(
    policy: Policy,
    guards: Mapping[str, Guard],
    lines: Sequence[EvalLine],
    images: Mapping[int, Image.Image],
) -> list[tuple[set[str], bool]]:
    """Per line (in order): the categories that hit, and whether it was blocked."""
    pipeline = GuardPipeline(policy, bound_guards(policy, guards), quiet=True)
    out: list[tuple[set[str], bool] | None] = [None] * len(lines)
    batches: list[list[int]] = []
    for stage in ("input", "output"):
        indexes = [i for i, line in enumerate(lines) if line.stage == stage]
        batches += [indexes[k : k + EVAL_BATCH] for k in range(0, len(indexes), EVAL_BATCH)]
    slots = asyncio.Semaphore(EVAL_CONCURRENCY)

    async def run(batch: list[int]) -> None:
        items = [guard_input(lines[i], images.get(lines[i].line)) for i in batch]
        async with slots:
            decisions = await pipeline.run(lines[batch[0]].stage, items)
        for i, decision in zip(batch, decisions, strict=True):
            out[i] = (set(decision.hits), decision.blocked)

    await asyncio.gather(*(run(b) for b in batches))
    return [p for p in out if p is not None]


def scores(lines: Sequence[EvalLine], predicted: Sequence[tuple[set[str], bool]]) -> dict[str, Any]:
    """Per category precision, recall and false-positive rate (and counts)."""
    categories = sorted(
        {c for line in lines for c in line.expected} | {c for p, _ in predicted for c in p}
    )
    table: dict[str, Any] = {}
    for category in [*categories, "(any)"]:
        tally = Counts()
        for line, (hits, _) in zip(lines, predicted, strict=True):
            if category == "(any)":
                tally.add(bool(line.expected), bool(hits))
            else:
                tally.add(category in line.expected, category in hits)
        table[category] = {
            "tp": tally.tp,
            "fp": tally.fp,
            "fn": tally.fn,
            "tn": tally.tn,
            "precision": tally.precision,
            "recall": tally.recall,
            "fpr": tally.fpr,
        }
    return table


async def evaluate(
    saved: Policy | None,
    draft: Policy | None,
    guards: Mapping[str, Guard],
    lines: Sequence[EvalLine],
    images: Mapping[int, Image.Image],
) -> dict[str, Any]:
    """Both policies side by side over the lines, and the lines whose decision changed."""
    result: dict[str, Any] = {"lines": len(lines)}
    runs: dict[str, list[tuple[set[str], bool]]] = {}
    for label, policy in (("saved", saved), ("draft", draft)):
        if policy is None:
            continue
        runs[label] = await predictions(policy, guards, lines, images)
        result[label] = {
            "policy": policy.name,
            "version": policy.version,
            "blocked": sum(b for _, b in runs[label]),
            "categories": scores(lines, runs[label]),
        }
    changed = []
    if len(runs) == 2:
        for line, a, b in zip(lines, runs["saved"], runs["draft"], strict=True):
            if a != b:
                changed.append(
                    {
                        "line": line.line,
                        "text": line.text[:200],
                        "expected": sorted(line.expected),
                        "saved": {"hits": sorted(a[0]), "blocked": a[1]},
                        "draft": {"hits": sorted(b[0]), "blocked": b[1]},
                    }
                )
    result["changed"] = changed
    return result
