"""What `/v1/moderations` gains from batching, and what per-category probabilities cost, on a
tiny Llama Guard 3 (1B template, random weights: ratios only, never absolute figures).

    python bench/moderations_cpu.py [--inputs 8] [--repeats 10]

1. Batching: one guard pipeline run over N inputs (what one moderation request with N inputs
   does) against N runs of one input each, in the same process.
2. Per-category probabilities: `classify_batch` with the code tokens riding on the scoring pass
   (the default) against the same guard with them switched off (`code_tokens = {}`: P(unsafe)
   only), same inputs. The threshold is 1.0 so that nothing is continued by generation: the
   scoring pass alone is compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root: `testkit` (test support, not installed) lives there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

from guards.base import GuardInput
from guards.llama_guard import LlamaGuard
from guards.pipeline import GuardPipeline
from guards.policy_loader import parse_policy
from model.engine import ChatTurn, TextPart
from testkit.tiny_guard_models import build_tiny_llama_guard

POLICY = "version: 1\nguards:\n  llama_guard: {stages: [input]}\n"


def items(n: int) -> list[GuardInput]:
    text = "Please summarise the attached report and list the three main risks it names. "
    return [
        GuardInput("input", (ChatTurn("user", (TextPart(f"{i}: {text * 3}"),)),)) for i in range(n)
    ]


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    path = build_tiny_llama_guard(pathlib.Path(tempfile.mkdtemp()) / "lg")
    guard = LlamaGuard(path, device="cpu", threshold=1.0, max_batch=args.inputs)
    pipeline = GuardPipeline(parse_policy(POLICY, stem="bench"), {"llama_guard": guard})
    batch = items(args.inputs)
    loop = asyncio.new_event_loop()

    def one_run() -> None:
        loop.run_until_complete(pipeline.run("input", batch))

    def n_runs() -> None:
        for item in batch:
            loop.run_until_complete(pipeline.run("input", [item]))

    batched, sequential = timed(one_run, args.repeats), timed(n_runs, args.repeats)
    print(
        f"batching, {args.inputs} inputs: one run {batched * 1e3:.1f} ms, "
        f"{args.inputs} runs {sequential * 1e3:.1f} ms, ratio {sequential / batched:.2f}x"
    )

    with_codes = timed(lambda: guard.classify_batch(batch), args.repeats)
    saved = guard.code_tokens
    guard.code_tokens = {}
    without = timed(lambda: guard.classify_batch(batch), args.repeats)
    guard.code_tokens = saved
    print(
        f"scoring pass, {args.inputs} inputs: with per-code probabilities "
        f"{with_codes * 1e3:.1f} ms, P(unsafe) only {without * 1e3:.1f} ms, "
        f"ratio {with_codes / without:.3f}"
    )
    guard.close()
    loop.close()


if __name__ == "__main__":
    main()
