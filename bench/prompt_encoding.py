"""Encoding a batch for the batch engine: the processor's own padded call (the old way, not
thread-safe) against `PromptEncoder.encode` per row + `collate` (the new way), on the demo
checkpoint's real processor, in one process. Prints the median time of each and their ratio.

    PYTHONPATH=. python bench/prompt_encoding.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoProcessor

from model.demo_model import build_demo_model
from model.encoding import PromptEncoder, collate
from model.engine import ChatTurn, ImagePart, TextPart


def _median_ms(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(build_demo_model(Path(tempfile.mkdtemp())))
    encoder = PromptEncoder(processor)
    words = ["the", "harbour", "at", "dawn", "is", "quiet", "and", "the", "boats", "sleep"]
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in (3, 40, 120, 400)] * 2
    batches = {
        "text x8": [(encoder.render((ChatTurn("user", (TextPart(t),)),))) for t in texts],
        "image x4": [
            encoder.render(
                (ChatTurn("user", (ImagePart(Image.new("RGB", (64 + 30 * i, 48))), TextPart(t))),)
            )
            for i, t in enumerate(texts[:4])
        ],
    }
    processor.tokenizer.padding_side = "left"
    for name, rows in batches.items():
        prompts = [p for p, _ in rows]
        images = [imgs for _, imgs in rows] if any(imgs for _, imgs in rows) else None

        def old(prompts: list[str] = prompts, images: Any = images) -> Any:
            return processor(
                text=prompts,
                images=images,
                padding=True,
                add_special_tokens=False,
                return_tensors="pt",
            )

        def new(rows: list[tuple[str, list[Image.Image]]] = rows) -> Any:
            return collate([encoder.encode(p, i) for p, i in rows], encoder.pad_id)

        old_ms, new_ms = _median_ms(old, args.rounds), _median_ms(new, args.rounds)
        print(
            f"{name}: processor(padding=True) {old_ms:.3f} ms, encode+collate {new_ms:.3f} ms,"
            f" ratio new/old {new_ms / old_ms:.2f}"
        )


if __name__ == "__main__":
    main()
