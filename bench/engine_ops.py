"""Operations and CPU time per decode step of the fast engine, at the real layer structure.

    python bench/engine_ops.py                  # this tree
    python bench/engine_ops.py --before DIR     # and DIR (e.g. `git archive REV`), side by side

Why: at batch 1 on a GPU a decode step is the weights' read (~4.3 ms on an H200 for 11B) plus
one launch per kernel; a few microseconds each even inside a CUDA graph, and transformers'
Mllama layer runs ~40 of them. No GPU is needed to count them: the model here has the real
11B *structure* (40 decoder layers, cross-attention at 3, 8, ..., 38; grouped-query attention;
SiLU MLP) with tiny widths, so the number of operations per step is the 11B one, and the CPU
time per step (tiny widths: almost all of it is dispatch) tracks the launch overhead that a
CUDA graph removes from the host but not from the device.

Counted: every non-view ATen operation that reaches the dispatcher in one decode step (views
such as slice/reshape launch nothing). On CUDA `linear` is one GEMM and `rms_norm` one fused
kernel (`_fused_rms_norm`); SDPA is one attention kernel (plus a mask copy when the mask's last
dimension is not a multiple of 16).

Reference: transformers' own eager forward for one decode token over its dynamic cache (same
model, same request), measured in the same process.

Also measured: the continuous batcher's own host work per decode step (sampling, next inputs,
detokenizing, events), outside the decode call, on the demo model: what a GPU step pays on
top of its graph replay.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("ENGINE_OPS_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

REAL_LAYERS = 40
REAL_CROSS = [3, 8, 13, 18, 23, 28, 33, 38]


class OpCounter(TorchDispatchMode):
    """Counts the non-view operations dispatched inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.counts[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def build_model() -> tuple[Any, Any]:
    """The demo model's widths and tokenizer, with the real 11B layer structure."""
    from transformers import AutoProcessor, MllamaConfig, MllamaForConditionalGeneration

    from model.demo_model import build_demo_model

    demo = build_demo_model(Path(tempfile.mkdtemp(prefix="ops-demo-")))
    config = MllamaConfig.from_pretrained(demo)
    text: Any = config.text_config
    text.num_hidden_layers = REAL_LAYERS
    text.cross_attention_layers = REAL_CROSS
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init closes the gates: open them so that images matter
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    return model, AutoProcessor.from_pretrained(demo)


def image_inputs(processor: Any, with_image: bool) -> dict[str, torch.Tensor]:
    from PIL import Image

    content: list[dict[str, str]] = [{"type": "text", "text": "Describe the picture, please."}]
    images = None
    if with_image:
        content.insert(0, {"type": "image"})
        images = [[Image.new("RGB", (112, 112), (200, 30, 60))]]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return dict(
        processor(text=[prompt], images=images, add_special_tokens=False, return_tensors="pt")
    )


def per_step_ms(fn: Any, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def measure_fast(model: Any, processor: Any, repeats: int) -> dict[str, Any]:
    from model.fast.forward import FastForward, PrefillChunk, make_decode_inputs
    from model.fast.kv_cache import CacheGeometry, StaticKVCache

    geometry = CacheGeometry.from_model(model, max_len=512, max_images=1, dtype=torch.float32)
    # Older trees (--before) built the masks outside the step and took the dtype.
    takes_dtype = "dtype" in inspect.signature(make_decode_inputs).parameters
    extra: dict[str, Any] = {"dtype": torch.float32} if takes_dtype else {}
    forward = FastForward(model, StaticKVCache(geometry, slots=8, device=torch.device("cpu")))
    result: dict[str, Any] = {}
    for case, with_image in (("text", False), ("image", True)):
        inputs = image_inputs(processor, with_image)
        ids = inputs["input_ids"][0]
        vision = None
        if with_image:
            states = forward.encode_images(
                inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
            )
            forward.write_cross_kv(0, torch.cat(states))
            tiles = int(inputs["aspect_ratio_mask"][0, 0].sum())
            vision = inputs["cross_attention_mask"][0, :, 0, :tiles].bool()
            vision = vision.repeat_interleave(forward.tokens_per_tile, dim=1)
        forward.prefill([PrefillChunk(0, ids, 0, vision, True)])
        forward.cache.set_vision_mask(0, vision[-1] if vision is not None else None)
        n = int(ids.shape[0])
        for rows in (1, 8):
            step = make_decode_inputs(
                forward.cache,
                {0: (5, n)},
                n=rows,
                kv_len=256,
                vision_len=geometry.max_vision_tokens if with_image else 0,
                **extra,
            )
            with OpCounter() as counter:
                forward.decode(step)
            result[f"fast {case} n={rows} ops"] = counter.total
            timed = per_step_ms(lambda s=step: forward.decode(s), repeats)
            result[f"fast {case} n={rows} ms"] = timed
            if rows == 1:
                result[f"fast {case} n=1 by op"] = dict(counter.counts.most_common())
    return result


@torch.inference_mode()
def measure_transformers(model: Any, processor: Any, repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for case, with_image in (("text", False), ("image", True)):
        inputs = image_inputs(processor, with_image)
        out = model(**inputs, use_cache=True)
        # The cache grows by one token a call (a few hundred calls: a negligible difference).
        step: dict[str, Any] = {"input_ids": torch.tensor([[5]]), "use_cache": True}
        if hasattr(out, "cache"):
            step["cache"] = out.cache
        else:
            step["past_key_values"] = out.past_key_values
        if with_image:
            step["cross_attention_mask"] = inputs["cross_attention_mask"][:, -1:]

        def one(step: dict[str, Any] = step) -> None:
            model(**step)

        with OpCounter() as counter:
            one()
        result[f"transformers {case} n=1 ops"] = counter.total
        result[f"transformers {case} n=1 ms"] = per_step_ms(one, repeats)
    return result


def measure_batcher(tokens: int = 400) -> dict[str, float]:
    """The continuous batcher's own host work per decode step (sampling, inputs, detokenizing,
    events): the median step time minus the median time inside the decode call, for one
    greedy stream on the demo model (through the graph path's static buffers)."""
    import asyncio

    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from model.demo_model import build_demo_model
    from model.engine import ChatTurn, EngineRequest, SamplingParams, TextPart
    from model.fast import FastEngineConfig, FastMllamaEngine

    demo = build_demo_model(Path(tempfile.mkdtemp(prefix="ops-demo-")))
    model = MllamaForConditionalGeneration.from_pretrained(demo).eval()
    config = FastEngineConfig(max_len=1024, max_slots=4, static_decode_on_cpu=True)
    engine = FastMllamaEngine.from_loaded(
        model, AutoProcessor.from_pretrained(demo), model_id="ops", config=config
    )
    asyncio.run(engine.start())
    graphs = engine.graphs
    assert graphs is not None
    inside: list[float] = []
    run = graphs.run

    def timed_run(inputs: Any) -> torch.Tensor:  # bench instrumentation, not a behaviour change
        started = time.perf_counter()
        out = run(inputs)
        inside.append(time.perf_counter() - started)
        return out

    graphs.run = timed_run  # type: ignore[method-assign]
    steps: list[float] = []
    engine.batcher.on_step = lambda _: steps.append(time.perf_counter())
    turn = ChatTurn("user", (TextPart("Hello there, how are you today?"),))
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    request = EngineRequest("ops", (turn,), params)

    async def generate() -> None:
        async for _ in engine.generate(request):
            pass

    asyncio.run(generate())
    asyncio.run(engine.stop())
    step = statistics.median(b - a for a, b in itertools.pairwise(steps[5:]))
    decode = statistics.median(inside[5:])
    return {"step ms": step * 1e3, "decode ms": decode * 1e3, "batcher ms": (step - decode) * 1e3}


def measure(repeats: int, with_transformers: bool) -> dict[str, Any]:
    torch.set_num_threads(1)  # dispatch cost, not the tiny GEMMs' threading
    model, processor = build_model()
    result: dict[str, Any] = {"torch": torch.__version__}
    if with_transformers:  # before the fast forward fuses the model's weights
        result |= measure_transformers(model, processor, repeats)
    result |= measure_fast(model, processor, repeats)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout to measure side by side")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the raw measurements")
    args = parser.parse_args()
    if args.json:  # the child process of --before
        print(json.dumps(measure(args.repeats, with_transformers=False)))
        return 0
    before: dict[str, Any] = {}
    if args.before is not None:
        child = subprocess.run(
            [sys.executable, __file__, "--json", "--repeats", str(args.repeats)],
            env={**os.environ, "ENGINE_OPS_ROOT": str(args.before.resolve())},
            capture_output=True,
            text=True,
            check=True,
        )
        before = json.loads(child.stdout.strip().splitlines()[-1])
    after = measure(args.repeats, with_transformers=True)
    print(f"## Decode step at the 11B layer structure (CPU, torch {after['torch']})\n")
    header = "| case | transformers eager |"
    header += " fast, before |" if before else ""
    print(header + " fast |")
    print("| --- | ---: |" + (" ---: |" if before else "") + " ---: |")
    for case in ("text", "image"):
        for rows in (1, 8):
            for unit in ("ops", "ms"):
                fmt = "{:d}" if unit == "ops" else "{:.2f}"
                ref = after.get(f"transformers {case} n={rows} {unit}")
                cells = [fmt.format(ref) if ref is not None else "-"]
                if before:
                    cells.append(fmt.format(before[f"fast {case} n={rows} {unit}"]))
                cells.append(fmt.format(after[f"fast {case} n={rows} {unit}"]))
                label = "operations" if unit == "ops" else "CPU ms per step"
                print(
                    f"| {case}, {rows} row{'s' if rows > 1 else ''}: {label} | "
                    + " | ".join(cells)
                    + " |"
                )
    batcher = measure_batcher()
    print(
        f"\nBatcher's own work per decode step (1 greedy stream, demo model): "
        f"{batcher['batcher ms']:.3f} ms (step {batcher['step ms']:.3f} ms, "
        f"of which decode {batcher['decode ms']:.3f} ms)"
    )
    print("\nfast, text, 1 row, by operation:", after["fast text n=1 by op"])
    if before:
        print("before, text, 1 row, by operation:", before["fast text n=1 by op"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
