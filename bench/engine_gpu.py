"""Fast engine vs baseline at the real Llama 3.2-11B-Vision shapes, random weights, one GPU.

    python bench/engine_gpu.py            # H100/H200, bf16, ~4-6 minutes (compile included)
    python bench/engine_gpu.py --tiny     # the demo model on the CPU: an end-to-end dry run

The model is built directly on the GPU with random weights (`_from_config` under
`torch.device("cuda")`): nothing is downloaded or written to disk. The tokenizer is the demo
one (its ids are valid in the 128,256 vocabulary; most sampled ids decode to nothing, so times
come from the engines' own token timestamps, not from text deltas), with 560x560 tiles.

Side by side, in one process:

1. batch-1 text decode tok/s: `generate()` with a static cache (compiled decode: the baseline
   from FACTS) vs the fast engine;
2. batch-1 image (one 4-tile image): decode tok/s and time to first token;
3. `--streams` concurrent streams, one image each, arriving over time: total tok/s and TTFT
   p50/p99, baseline = the current engine (`BatchScheduler`, batches of 8, eager);
4. numerical check: the fast path's prefill and decode logits vs transformers' eager forward
   (with the #39379 fix patched in, see `testkit/fast_reference.py`), and CUDA-graph decode vs
   eager decode; bf16 tolerance.

Needs transformers >= 5.18 (static cache for Mllama); the current-engine baseline needs 5.24
(the `cache=` keyword) and is skipped below that.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
import transformers
from engine_gpu_checks import attention_backends, kernels_per_decode_step, logits_check
from engine_gpu_model import build, engine_request, log, test_image
from engine_gpu_runs import (
    Timings,
    baseline_generate,
    current_engine_streams,
    fast_one,
    fast_streams,
)
from packaging.version import Version
from PIL import Image


# -- main ----------------------------------------------------------------------------------------
class Report:
    """Rows printed as soon as they are measured (a failure later loses nothing), then a table.

    Each phase runs on its own: an exception is printed with its traceback and recorded as the
    phase's result, and the next phase still runs.
    """

    def __init__(self) -> None:
        self.failed: list[str] = []

    def phase(self, name: str, fn: Any, *args: Any) -> Any:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            result = fn(*args)
        except Exception:
            log(f"{name} FAILED after {time.perf_counter() - start:.1f} s")
            traceback.print_exc()
            sys.stdout.flush()
            self.failed.append(name)
            return None
        log(f"{name}: {result} ({time.perf_counter() - start:.1f} s)")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="demo model on the CPU (dry run)")
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--image-tokens", type=int, default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=None)
    parser.add_argument("--arrival-s", type=float, default=None, help="arrivals spread over")
    parser.add_argument("--fast-budget-gib", type=float, default=16.0)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument(
        "--no-baseline-compile",
        action="store_true",
        help="generate() with a static cache but no compile (saves minutes of GPU time)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--compile-decode",
        action="store_true",
        help="the fast decode step through torch.compile before capture (minutes on 11B)",
    )
    parser.add_argument("--no-current-engine", action="store_true", help="skip that baseline")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="switch SDPA's cuDNN kernel off (flash / memory-efficient only)",
    )
    args = parser.parse_args()
    tiny = args.tiny
    text_tokens = args.text_tokens or (16 if tiny else 128)
    image_tokens = args.image_tokens or (16 if tiny else 64)
    stream_tokens = args.stream_tokens or (8 if tiny else 256)
    arrival_s = args.arrival_s if args.arrival_s is not None else (0.5 if tiny else 2.0)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    if Version(transformers.__version__) < Version("5.18"):
        print(
            "transformers >= 5.18 is required (static cache for Mllama image requests crashes "
            "in 5.17, see FACTS); e.g. pip install 'transformers>=5.24,<5.40' "
            "'huggingface-hub>=1.5,<2'",
            file=sys.stderr,
        )
        return 2
    if not tiny and not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if tiny else "cuda")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}", flush=True)
    total_start = time.perf_counter()
    report = Report()

    from model.fast import FastEngineConfig, FastMllamaEngine

    log("building the model" + (" (demo, CPU)" if tiny else " (11B shapes, random, bf16)"))
    model, processor, build_s = build(tiny, device)
    if args.no_baseline_compile:
        model.generation_config.disable_compile = True
    params = sum(p.numel() for p in model.parameters()) / 1e9
    log(f"model: {params:.2f} B parameters in {build_s:.1f} s")
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    backends = report.phase("attention kernels", attention_backends, model, device)

    base_text = report.phase(
        "baseline generate(), text", baseline_generate, model, processor, None, text_tokens, device
    )
    base_image = report.phase(
        "baseline generate(), image",
        baseline_generate,
        model,
        processor,
        test_image(tiny),
        image_tokens,
        device,
    )

    config = FastEngineConfig(
        max_len=args.max_len,
        max_slots=max(32, args.streams),
        memory_budget_bytes=int(args.fast_budget_gib * (1 << 30)),
        image_cache_bytes=0,  # every request encodes its image: fair TTFT
        cuda_graphs=not args.no_cuda_graphs,
        compile_decode=args.compile_decode,
        # The dry run takes the graph path too (buckets, static buffers), without capture.
        static_decode_on_cpu=not args.no_cuda_graphs,
        # Compiled: one compile per bucket, so only the buckets these runs reach (below).
        graph_warmup=not args.compile_decode,
    )
    engine = FastMllamaEngine.from_loaded(
        model, processor, model_id="bench", config=config, eos_token_ids=()
    )
    start = time.perf_counter()
    report.phase("fast engine start", lambda: asyncio.run(engine.start()))
    start_s = time.perf_counter() - start
    captured_at_start = len(engine.graphs.captured) if engine.graphs is not None else 0
    log(f"fast engine start: {start_s:.1f} s, {captured_at_start} decode graphs captured")
    if engine.graph_error is not None:  # the engine went on eagerly
        log(f"decode graphs FAILED at start, eager decode instead: {engine.graph_error}")
        report.failed.append("decode graphs at start")
    timings = Timings()
    if engine.ready():  # else each fast phase below fails on its own, and the rest still runs
        engine.batcher.on_finish = timings
    capture_s = 0.0
    graphs = engine.graphs
    if graphs is not None and not config.graph_warmup:
        # Compiled, so not every bucket was captured at start: every bucket the runs below can
        # reach, before any timing (the longest context: longest prompt + most new tokens).
        prompts = [engine_request(None, 1, "n"), engine_request(test_image(tiny), 1, "n")]
        longest = max(engine.count_prompt_tokens(r) for r in prompts) + max(
            text_tokens, image_tokens, stream_tokens
        )
        kv_lengths = {graphs.bucket(1, n, 0)[1] for n in range(1, longest + 2)}
        keys = sorted(
            {
                graphs.bucket(b, kv, v)
                for b in graphs.batch_sizes
                for kv in kv_lengths
                for v in (0, 1)
            }
        )

        def capture() -> str:
            with torch.inference_mode():
                graphs.warmup(keys)
            return f"{len(keys)} buckets"

        start = time.perf_counter()
        if report.phase("capturing decode graphs", capture) is None:
            log("graph capture failed: the fast engine goes on with eager decode")
            engine.batcher.graphs = None
        capture_s = time.perf_counter() - start
    graphs_used = engine.ready() and engine.batcher.graphs is not None
    log(f"fast engine: {engine.info.max_batch_size} slots, graphs={graphs_used}")

    async def fast_single(image: Image.Image | None, n: int, tag: str) -> dict[str, float]:
        await fast_one(engine, engine_request(image, 4, f"warm-{tag}"), timings)
        return await fast_one(engine, engine_request(image, n, tag), timings)

    fast_text = report.phase(
        "fast engine, text b=1", lambda: asyncio.run(fast_single(None, text_tokens, "text"))
    )
    fast_image = report.phase(
        "fast engine, image b=1",
        lambda: asyncio.run(fast_single(test_image(tiny), image_tokens, "image")),
    )

    rng = random.Random(0)
    arrivals = sorted(rng.uniform(0.0, arrival_s) for _ in range(args.streams))
    tiles = [rng.choice((1, 2, 4, 4)) for _ in range(args.streams)]

    def stream_reqs(tag: str) -> list[Any]:
        return [
            engine_request(test_image(tiny, 1000 + i, tiles[i]), stream_tokens, f"{tag}{i}")
            for i in range(args.streams)
        ]

    fast_multi = report.phase(
        f"fast engine, {args.streams} streams",
        lambda: asyncio.run(fast_streams(engine, stream_reqs("s"), arrivals, timings)),
    )
    kernels = report.phase("kernels per eager decode step", kernels_per_decode_step, engine)
    check = report.phase("logits check", logits_check, model, processor, engine, tiny)
    asyncio.run(engine.stop())

    current = None
    current_skipped = True
    if args.no_current_engine:
        log("current engine baseline skipped (--no-current-engine)")
    elif Version(transformers.__version__) < Version("5.24"):
        log("current engine baseline skipped (needs transformers >= 5.24)")
    else:
        current_skipped = False
        current = report.phase(
            f"current engine (BatchScheduler, batch 8), {args.streams} streams",
            current_engine_streams,
            model,
            processor,
            stream_reqs("c"),
            arrivals,
            device,
        )

    def cell(result: dict[str, float] | None, key: str) -> str:
        return f"{result[key]:.1f}" if result is not None else "failed"

    rows = [
        ("text b=1 decode tok/s", cell(base_text, "tok_s"), cell(fast_text, "tok_s")),
        ("text b=1 TTFT ms", cell(base_text, "ttft_ms"), cell(fast_text, "ttft_ms")),
        ("image b=1 decode tok/s", cell(base_image, "tok_s"), cell(fast_image, "tok_s")),
        ("image b=1 TTFT ms", cell(base_image, "ttft_ms"), cell(fast_image, "ttft_ms")),
    ]
    for key, label in [
        ("tok_s", "total tok/s, whole run"),
        ("steady_tok_s", "total tok/s, all decoding"),
        ("p50_ms", "TTFT p50 ms"),
        ("p99_ms", "TTFT p99 ms"),
    ]:
        fast = cell(fast_multi, key)
        if key == "steady_tok_s":
            base = "skipped" if current_skipped else "-"  # the current engine runs <= 8 at once
            if fast_multi is not None and not fast_multi[key]:
                fast = f"n/a (at most {fast_multi['max_rows']:.0f} decoding at once)"
        else:
            base = "skipped" if current_skipped else cell(current, key)
        rows.append((f"{args.streams} image streams {label}", base, fast))

    print()
    mode = "CPU, tiny demo model, float32: NOT performance" if tiny else str(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"## Fast engine vs baseline ({mode}; {name})")
    print()
    print("| measurement | baseline | fast | fast/baseline |")
    print("| --- | ---: | ---: | ---: |")
    for label, base, fast in rows:
        try:
            r = float(fast) / float(base)
            if "TTFT" in label:
                r = float(base) / float(fast)  # > 1 means the fast engine is better
            shown = f"{r:.2f}x"
        except ValueError:
            shown = "-"
        print(f"| {label} | {base} | {fast} | {shown} |")
    print()
    print("Baselines: b=1 rows = generate() with a static cache (compiled decode on CUDA")
    print("unless --no-baseline-compile); streams = current BatchScheduler engine (batch 8).")
    print("TTFT ratio is baseline/fast (> 1: the fast engine answers sooner).")
    print(
        f"Fast engine: CUDA graphs {'on' if graphs_used else 'off'}"
        f"{' (static buffers, no capture, on the CPU)' if graphs_used and tiny else ''}, "
        f"compiled decode {'on' if args.compile_decode else 'off'}."
    )
    if backends is not None:
        print("Attention kernels: " + "; ".join(f"{k}: {v}" for k, v in backends.items()) + ".")
    if kernels is not None:
        unit = "kernels" if device.type == "cuda" else "profiled CPU ops (dry run)"
        print(
            f"Eager decode step, 1 row: {kernels['text kernels']:.0f} {unit} "
            f"({kernels['text kernel ms']:.2f} ms of kernel time) text, "
            f"{kernels['image kernels']:.0f} ({kernels['image kernel ms']:.2f} ms) image."
        )
    print()
    ok = check is not None
    if check is not None:
        print("| logits check | max abs diff | rel | cosine | same argmax |")
        print("| --- | ---: | ---: | ---: | ---: |")
        tol = 1e-4 if tiny else 3e-2
        for label, m in check.items():
            ok &= m["rel"] <= tol and m["cos"] >= (0.99999 if tiny else 0.999)
            print(
                f"| {label} | {m['max_abs']:.2e} | {m['rel']:.2e} | {m['cos']:.6f} | "
                f"{'yes' if m['argmax_equal'] else 'no'} |"
            )
        print()
        print(f"logits within tolerance (rel <= {tol:g}): {'PASS' if ok else 'FAIL'}")
    if report.failed:
        print(f"failed phases: {', '.join(report.failed)}")
    warm_text = f"{base_text['warmup_s']:.1f}" if base_text else "-"
    warm_image = f"{base_image['warmup_s']:.1f}" if base_image else "-"
    print(
        f"setup: model {build_s:.1f} s, baseline warm-up (compile) text {warm_text} s / image "
        f"{warm_image} s, fast engine start {start_s:.1f} s ({captured_at_start} graphs), "
        f"more graphs {capture_s:.1f} s; "
        f"total {time.perf_counter() - total_start:.1f} s"
    )
    return 0 if ok and not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
