"""What Prompt Guard costs on a CPU gateway: random weights at the real shapes, loaded through
`guards.prompt_guard.PromptGuard` (the code that loads real weights), timed per check.

    python bench/guard_models_cpu.py [--repeats 20] [--threads N]

Shapes: Prompt Guard 86M / Llama Prompt Guard 2 86M (mDeBERTa-v3-base: 12 layers, hidden 768,
vocabulary 251,000) and Llama Prompt Guard 2 22M (DeBERTa-v3-xsmall: 12 layers, hidden 384,
vocabulary 128,100). The tokenizer is the tests' small Unigram one (`testkit.tiny_guard_models`),
so the texts are sized by their token count, which the table reports; cost follows tokens, not
characters. Llama Guard is not measured here: a 1B decoder over its ~400-token template is a
GPU job (bench/engine_gpu.py; FACTS: 14.7 ms on an H200).
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
from typing import Any

import torch
from transformers import DebertaV2ForSequenceClassification

from guards.base import GuardInput
from guards.prompt_guard import PromptGuard
from model.engine import ChatTurn, TextPart
from testkit.tiny_guard_models import build_deberta_tokenizer, prompt_guard_config, save_tiny_model

SHAPES: dict[str, dict[str, Any]] = {
    "Prompt Guard 86M (mDeBERTa-v3-base)": {
        "vocab_size": 251_000,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "labels": "pg1",
    },
    "Llama Prompt Guard 2 22M (DeBERTa-v3-xsmall)": {
        "vocab_size": 128_100,
        "hidden_size": 384,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "labels": "pg2",
    },
}
SENTENCE = "Please translate the following document into French and summarise the key findings. "


def build(out_dir: pathlib.Path, shape: dict[str, Any]) -> pathlib.Path:
    tokenizer = build_deberta_tokenizer()
    config = prompt_guard_config(
        tokenizer,
        shape["labels"],
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=12,
        num_attention_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"],
    )
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(config).float().eval()
    return save_tiny_model(out_dir, model, tokenizer)


def prompt_of(guard: PromptGuard, tokens: int) -> tuple[GuardInput, int]:
    """A user prompt of about `tokens` tokens (with [CLS] and [SEP]) in this tokenizer."""
    text = SENTENCE
    while len(guard.tokenizer(text)["input_ids"]) < tokens:
        text += SENTENCE
    words = text.split()
    while len(words) > 1 and len(guard.tokenizer(" ".join(words))["input_ids"]) > tokens:
        words.pop()
    text = " ".join(words)
    item = GuardInput("input", (ChatTurn("user", (TextPart(text),)),))
    return item, len(guard.tokenizer(text)["input_ids"])


async def time_checks(guard: PromptGuard, item: GuardInput, repeats: int) -> list[float]:
    await guard.check([item])  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await guard.check([item])
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on the CPU")
    print("| model | tokens | p50 ms | p90 ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            guard = PromptGuard(build(pathlib.Path(tmp), shape), device="cpu")
            for tokens in (32, 128, 512):
                item, real = prompt_of(guard, tokens)
                times = sorted(asyncio.run(time_checks(guard, item, args.repeats)))
                p50 = statistics.median(times) * 1e3
                p90 = times[int(len(times) * 0.9) - 1] * 1e3
                print(f"| {name} | {real} | {p50:.1f} | {p90:.1f} |", flush=True)
            guard.close()


if __name__ == "__main__":
    main()
