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
   (with the #39379 fix patched in, see `model/fast/reference.py`), and CUDA-graph decode vs
   eager decode; bf16 tolerance.

Needs transformers >= 5.18 (static cache for Mllama); the current-engine baseline needs 5.24
(the `cache=` keyword) and is skipped below that.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
import transformers
from packaging.version import Version
from PIL import Image

REAL_TEXT = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 40,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
}
REAL_VISION = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "attention_heads": 16,
    "image_size": 560,
    "patch_size": 14,
    "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
    "vision_output_dim": 7680,
    "norm_eps": 1e-5,
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
PROMPT = "Describe a quiet harbour at dawn in three short sentences, with the boats and the gulls."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- model and processor ----------------------------------------------------------------------
def build(tiny: bool, device: torch.device) -> tuple[Any, Any, float]:
    """Random weights built in place on `device` (the demo config when tiny, else 11B shapes).

    `--tiny` takes the same path as the GPU run, only the config, dtype and device differ.
    """
    from transformers import (
        AutoProcessor,
        GenerationConfig,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
    )

    from model.demo_model import build_demo_model

    demo = build_demo_model(Path(tempfile.mkdtemp(prefix="bench-demo-")))
    processor = AutoProcessor.from_pretrained(demo)
    if tiny:
        config = MllamaConfig.from_pretrained(demo)
    else:
        config = MllamaConfig(
            text_config=REAL_TEXT, vision_config=REAL_VISION, image_token_index=128256
        )
    # The demo tokenizer (its ids are valid in any vocabulary), with the config's tile size.
    vision: Any = config.vision_config
    tile = int(vision.image_size)
    settings = processor.image_processor.to_dict()
    settings["size"] = {"height": tile, "width": tile}
    processor = MllamaProcessor(
        image_processor=type(processor.image_processor).from_dict(settings),
        tokenizer=processor.tokenizer,
        chat_template=processor.chat_template,
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    sync(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # allocated and initialised on the device, never on the host
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():  # random init closes the gates: open them so that images matter
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    model.eval()
    sync(device)
    build_s = time.perf_counter() - start
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tok.pad_token_id,
    )
    tok.padding_side = "left"
    return model, processor, build_s


def test_image(tiny: bool, seed: int = 0, tiles: int = 4) -> Image.Image:
    """An image of `tiles` tiles (2x2 for 4) with some structure."""
    tile = 56 if tiny else 560
    w, h = {1: (tile, tile), 2: (2 * tile, tile), 4: (2 * tile, 2 * tile)}[tiles]
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(200):
        img.putpixel((rng.randrange(w), rng.randrange(h)), (255, rng.randrange(256), 0))
    return img


def messages(processor: Any, image: Image.Image | None, text: str = PROMPT) -> str:
    content: list[dict[str, str]] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image"})
    return str(
        processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    )


def engine_request(image: Image.Image | None, max_tokens: int, rid: str) -> Any:
    from model.engine import ChatTurn, EngineRequest, ImagePart, SamplingParams, TextPart

    parts: tuple[Any, ...] = (TextPart(PROMPT),)
    if image is not None:
        parts = (ImagePart(image), *parts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return EngineRequest(rid, (ChatTurn("user", parts),), params)


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
    from model.engine import Finished
    from model.prompt import render_prompt
    from model.runner import MllamaRunner
    from model.scheduler import BatchScheduler, Sequence

    scheduler = BatchScheduler(MllamaRunner(model, processor, device), processor.tokenizer, (), 8)
    first: dict[int, float] = {}
    original_step = scheduler._step

    def step(seq: Sequence, logits: torch.Tensor) -> int | None:
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


# -- numerical check -----------------------------------------------------------------------------
def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    ref, got = ref.float().flatten(), got.float().flatten()
    diff = (ref - got).abs().max().item()
    return {
        "max_abs": diff,
        "rel": diff / max(ref.abs().max().item(), 1e-6),
        "cos": torch.nn.functional.cosine_similarity(ref, got, dim=0).item(),
        "argmax_equal": float(int(ref.argmax()) == int(got.argmax())),
    }


@torch.inference_mode()
def logits_check(
    model: Any, processor: Any, engine: Any, tiny: bool
) -> dict[str, dict[str, float]]:
    from model.fast.forward import FastForward, PrefillChunk, make_decode_inputs
    from model.fast.graphs import DecodeGraphs
    from model.fast.kv_cache import CacheGeometry, StaticKVCache
    from model.fast.reference import transformers_row_mask_fix

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    image = test_image(tiny, seed=99)
    prompt = messages(processor, image)
    inputs = processor(
        text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt"
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    cache_kw = (
        "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    )
    with transformers_row_mask_fix():
        out = model(**inputs, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        step = model(
            input_ids=torch.tensor([[token]], device=device),
            cross_attention_mask=inputs["cross_attention_mask"][:, -1:],
            use_cache=True,
            **{cache_kw: getattr(out, cache_kw)},
        )
    geometry = CacheGeometry.from_model(model, max_len=256, max_images=1, dtype=dtype)
    forward = FastForward(model, StaticKVCache(geometry, slots=1, device=device))
    ids, tile_mask, images = engine.prepare(prompt, [image])
    states = forward.encode_images(
        images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask
    )
    forward.write_cross_kv(0, torch.cat(states))
    vision = tile_mask.repeat_interleave(forward.tokens_per_tile, dim=1).to(device)
    prefill = forward.prefill([PrefillChunk(0, ids.to(device), 0, vision, True)])[0]
    n = int(ids.shape[0])
    rows = {0: (token, n)}
    forward.cache.set_vision_mask(0, vision[-1])
    eager = forward.decode(
        make_decode_inputs(forward.cache, rows, n=1, kv_len=n + 1, vision_len=vision.shape[-1])
    )[0]
    result = {
        "prefill vs eager": compare(out.logits[0, -1], prefill),
        "decode vs eager": compare(step.logits[0, -1], eager),
    }
    # The graph path (on the CPU: its buckets and static buffers, no capture) against our own
    # eager decode; the padded bucket (idle rows, longer kv, full vision) must not change row 0.
    graphs = DecodeGraphs(forward, batch_sizes=(1,), min_kv_len=256, capture=device.type == "cuda")
    b, kv_len, vis = graphs.bucket(1, n + 1, vision.shape[-1])
    padded = make_decode_inputs(forward.cache, rows, n=b, kv_len=kv_len, vision_len=vis)
    result["graph decode vs eager"] = compare(eager, graphs.run(padded)[0].clone())
    return result


# -- attention kernels ---------------------------------------------------------------------------
@torch.inference_mode()
def attention_backends(model: Any, device: torch.device) -> dict[str, str]:
    """Which SDPA kernel runs for the fast engine's attention shapes (bf16 on the GPU), each
    called once. If one fails on cuDNN (which SDPA may prefer on sm90), cuDNN attention is
    switched off for the whole process and the call retried on what SDPA picks next."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    text = model.config.get_text_config(decoder=True)
    vision = model.config.vision_config
    heads, kv_heads = int(text.num_attention_heads), int(text.num_key_value_heads)
    dim = int(text.hidden_size) // heads
    vision_heads = int(vision.attention_heads)
    vision_dim = int(vision.hidden_size) // vision_heads
    image = int(vision.max_num_tiles) * int(model.model.vision_model.num_patches)
    dtype = next(model.parameters()).dtype

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    def mask(queries: int, keys: int) -> torch.Tensor:
        return torch.zeros(1, 1, queries, keys, device=device, dtype=dtype)

    rep = heads // kv_heads
    cases = {
        "decode self, kv 256": (t(1, kv_heads, rep, dim), t(1, kv_heads, 256, dim), mask(1, 256)),
        "decode cross, 4 tiles": (
            t(1, kv_heads, rep, dim),
            t(1, kv_heads, image, dim),
            mask(1, image),
        ),
        "prefill self, 40 tokens": (t(1, heads, 40, dim), t(1, heads, 40, dim), mask(40, 40)),
        "vision, real queries": (
            t(1, vision_heads, image, vision_dim),
            t(1, vision_heads, image + 28, vision_dim),
            None,
        ),
    }
    result: dict[str, str] = {}
    for name, (q, k, m) in cases.items():
        chosen = SDPBackend(torch._fused_sdp_choice(q, k, k, attn_mask=m)).name
        try:
            F.scaled_dot_product_attention(q, k, k, attn_mask=m)
            sync(device)
            result[name] = chosen
        except RuntimeError as exc:
            if chosen != "CUDNN_ATTENTION":
                raise
            torch.backends.cuda.enable_cudnn_sdp(False)
            retry = SDPBackend(torch._fused_sdp_choice(q, k, k, attn_mask=m)).name
            F.scaled_dot_product_attention(q, k, k, attn_mask=m)
            sync(device)
            result[name] = f"CUDNN_ATTENTION failed ({str(exc)[:80]}); cuDNN off, now {retry}"
    return result


# -- kernels per decode step (GPU) ---------------------------------------------------------------
@torch.inference_mode()
def kernels_per_decode_step(engine: Any) -> dict[str, float]:
    """CUDA kernels launched by one eager decode step (1 row, text and image), from the
    profiler: the count a CUDA graph replays (`bench/engine_ops.py` counts operations on the
    CPU; this checks that count on the device)."""
    from torch.profiler import ProfilerActivity, profile

    from model.fast.forward import make_decode_inputs

    forward = engine.batcher.forward
    cache = forward.cache
    result: dict[str, float] = {}
    for name, vision in (("text", 0), ("image", cache.geometry.max_vision_tokens)):
        step = make_decode_inputs(cache, {0: (5, 10)}, n=1, kv_len=256, vision_len=vision)
        forward.decode(step)  # warm: cuBLAS handles, autotuning
        sync(forward.device)
        # On the CPU (--tiny dry run) this counts every profiled CPU op, nested ones included:
        # it only checks that the code runs.
        on_cuda = forward.device.type == "cuda"
        activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
        kind = torch.autograd.DeviceType.CUDA if on_cuda else torch.autograd.DeviceType.CPU
        with profile(activities=[activity]) as prof:
            forward.decode(step)
            sync(forward.device)
        kernels = [
            e
            for e in prof.events()
            if e.device_type == kind and not e.name.startswith(("Memcpy", "Memset"))
        ]
        result[f"{name} kernels"] = float(len(kernels))
        result[f"{name} kernel ms"] = sum(e.device_time for e in kernels) / 1e3
    return result


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
    if graphs is not None:
        # Every bucket the runs below can reach, captured before any timing: the longest
        # context is the longest prompt plus the most new tokens.
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
