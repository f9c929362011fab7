"""The timed runs of `bench/engine_gpu.py`: the baselines (`generate()` with a static cache,
the current `BatchScheduler` engine) and the fast engine, alone and with streams.

Imported by `bench/engine_gpu.py`, which puts the repository root on `sys.path`.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import torch
from engine_gpu_model import messages, sync
from PIL import Image


# -- baseline: generate() with a static cache --------------------------------------------------
def baseline_generate(
    model: Any, processor: Any, image: Image.Image | None, n: int, device: torch.device
) -> dict[str, float]:
    prompt = messages(processor, image)
    inputs = processor(
        text=[prompt],
        images=[[image]] if image is not None else None,
        add_special_tokens=False,
        return_tensors="pt",
    ).to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    def gen(new: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **inputs,
                do_sample=False,
                cache_implementation="static",
                max_new_tokens=new,
                min_new_tokens=new,
            )
        sync(device)
        return time.perf_counter() - start

    warm = gen(n)  # compiles the decode step on CUDA (FACTS: 40-80 s per shape)
    first = statistics.median(gen(1) for _ in range(3))  # prefill + first token
    total = statistics.median(gen(n) for _ in range(3))
    # Decode rate from the difference: the prefill is in both.
    tok_s = (n - 1) / max(total - first, 1e-9)
    return {"warmup_s": warm, "ttft_ms": first * 1e3, "tok_s": tok_s}


# -- fast engine -------------------------------------------------------------------------------
class Timings:
    """Finished sequences of the fast engine, by request id."""

    def __init__(self) -> None:
        self.seqs: dict[str, Any] = {}

    def __call__(self, seq: Any) -> None:
        self.seqs[seq.request.request_id] = seq


async def fast_one(engine: Any, req: Any, timings: Timings) -> dict[str, float]:
    async for _ in engine.generate(req):
        pass
    seq = timings.seqs[req.request_id]
    n = seq.completion_tokens
    return {
        "ttft_ms": (seq.first_token_at - seq.submitted_at) * 1e3,
        "tok_s": (n - 1) / (seq.finished_at - seq.first_token_at),
    }


async def fast_streams(
    engine: Any, reqs: list[Any], arrivals: list[float], timings: Timings
) -> dict[str, float]:
    """Whole-run and steady-state throughput, and TTFT, of streams arriving over time.

    Steady state: from the first step at which every stream is decoding to the first step at
    which one has finished (per-step token counts from the batcher), i.e. the rate with all
    of them in the batch. 0 when the first stream finishes before the last one starts.
    """
    arrived: dict[str, float] = {}
    batcher = engine.batcher
    marks: list[tuple[float, int, int]] = []  # (time, tokens so far, rows decoded this step)
    batcher.on_step = lambda b: marks.append((time.perf_counter(), b.tokens_out, b.decoded_rows))

    async def one(req: Any, at: float) -> None:
        await asyncio.sleep(at)
        arrived[req.request_id] = time.perf_counter()
        async for _ in engine.generate(req):
            pass

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(r, a) for r, a in zip(reqs, arrivals, strict=True)))
    finally:
        batcher.on_step = None
    seqs = [timings.seqs[r.request_id] for r in reqs]
    ttft = [(s.first_token_at - arrived[s.request.request_id]) * 1e3 for s in seqs]
    total = sum(s.completion_tokens for s in seqs)
    result = summarize(ttft, total, max(s.finished_at for s in seqs) - start)
    full = [i for i, (_, _, rows) in enumerate(marks) if rows >= len(reqs)]
    steady = 0.0
    if len(full) >= 2:
        (t0, n0, _), (t1, n1, _) = marks[full[0]], marks[full[-1]]
        steady = (n1 - n0) / max(t1 - t0, 1e-9)
    result["steady_tok_s"] = steady
    result["max_rows"] = float(max((rows for _, _, rows in marks), default=0))
    return result


def summarize(ttft: list[float], tokens: int, seconds: float) -> dict[str, float]:
    ttft = sorted(ttft)
    p99 = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    return {"tok_s": tokens / seconds, "p50_ms": statistics.median(ttft), "p99_ms": p99}


# -- baseline for streams: the current engine (BatchScheduler) ---------------------------------
def current_engine_streams(
    model: Any, processor: Any, reqs: list[Any], arrivals: list[float], device: torch.device
) -> dict[str, float]:
    from model.encoding import PromptEncoder
    from model.engine import Finished
    from model.prompt import render_prompt
    from model.runner import MllamaRunner
    from model.scheduler import BatchScheduler, ScheduledRequest

    encoder = PromptEncoder(processor)
    scheduler = BatchScheduler(MllamaRunner(model, encoder.pad_id, device), encoder, (), 8)
    first: dict[int, float] = {}
    original_step = scheduler._step

    def step(seq: ScheduledRequest, logits: torch.Tensor) -> int | None:
        first.setdefault(id(seq), time.perf_counter())
        return original_step(seq, logits)

    scheduler._step = step  # type: ignore[method-assign]
    scheduler.start()
    done = threading.Semaphore(0)
    finished_at: dict[int, float] = {}
    arrived: dict[int, float] = {}
    seqs = []

    def emit_for(key: list[int]) -> Any:
        def emit(event: Any) -> None:
            if isinstance(event, Finished):
                finished_at[key[0]] = time.perf_counter()
                done.release()

        return emit

    start = time.perf_counter()
    for req, at in zip(reqs, arrivals, strict=True):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        prompt, images = render_prompt(processor, req.messages)
        key: list[int] = []
        seq = scheduler.new_sequence(req, prompt, images, emit_for(key))
        key.append(id(seq))
        arrived[id(seq)] = time.perf_counter()
        seqs.append(seq)
        scheduler.submit(seq)
    for _ in reqs:
        done.acquire()
    scheduler.stop()
    ttft = [(first[id(s)] - arrived[id(s)]) * 1e3 for s in seqs]
    total = sum(s.completion_tokens for s in seqs)
    return summarize(ttft, total, max(finished_at.values()) - start)
