"""The fast engine's CUDA-graph path on the CPU: its buckets, idle rows and static buffers
(without capture), the compiled step, warm-up at start and the fallback to eager decode."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from model.fast.forward import FastForward, make_decode_inputs
from model.fast.graphs import DecodeGraphs
from tests.model.fast_support import (
    BLUE,
    GREEN,
    RED,
    TEXTS,
    assert_matches_reference,
    encode,
    image,
    make_engine,
    prefill,
    recorded,
    request,
    run,
    together,
)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_buckets_and_static_buffers_give_the_same_tokens(
    loaded: tuple[Any, Any], compiled: bool
) -> None:
    """The CUDA-graph path without the capture (`static_decode_on_cpu`): rows padded to a
    bucket with idle rows, kv length to a power of two, vision to the slot's full capacity, and
    every input copied into one static buffer set per bucket; tokens still equal generate().
    Compiled: the same through `torch.compile(fullgraph=True)` (aot_eager: dynamo's trace and
    functionalization, as inductor gets them, without code generation)."""
    engine = make_engine(
        loaded,
        static_decode_on_cpu=True,
        graph_batch_sizes=(1, 2, 4),
        graph_min_kv_len=16,
        graph_warmup=False,  # buckets captured on first use: which ones is asserted below
        compile_decode=compiled,
        compile_backend="aot_eager",
    )
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        graphs = engine.graphs
        assert graphs is not None and not graphs.capture
        assert engine.info.extra["cuda_graphs"] == "false"  # nothing captured on the CPU
        reqs = [
            request(TEXTS[0], rid="g-t0"),
            request("What is in this picture?", image(RED), rid="g-i0"),
            request(TEXTS[1], rid="g-t1", max_tokens=20),
        ]
        texts = asyncio.run(together(engine, reqs))
        alone = request("Colour?", image(BLUE, (56, 56)), rid="g-i1", max_tokens=7)
        texts.append(asyncio.run(run(engine, alone))[0])
        for req, text in zip([*reqs, alone], texts, strict=True):
            assert_matches_reference(engine, loaded, req, text)
        buckets = graphs.captured
        max_vision = engine.batcher.cache.geometry.max_vision_tokens
        # 3 rows ran in the 4-row bucket (one idle row), 1 row alone in the 1-row bucket; the
        # kv lengths are powers of two (several of them); steps with an image used the full
        # vision width.
        assert {1, 4} <= {rows for rows, _, _ in buckets} <= {1, 2, 4}
        kv_lengths = {kv for _, kv, _ in buckets}
        assert len(kv_lengths) >= 2 and all(kv >= 16 and kv & (kv - 1) == 0 for kv in kv_lengths)
        assert {vision for _, _, vision in buckets} == {0, max_vision}
        # Every decode step went through the static path: the three requests were prefilled in
        # one step and then decoded side by side, the fourth alone.
        done = recorded(engine)
        batch_steps = max(done[r.request_id].completion_tokens for r in reqs) - 1
        assert graphs.replays == batch_steps + done["g-i1"].completion_tokens - 1
        # Compiled: one graph per bucket, none broken up (fullgraph), none run eagerly.
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiles
        assert compiled_graphs == (len(buckets) if compiled else 0)
    finally:
        asyncio.run(engine.stop())


def test_every_bucket_is_captured_at_start(loaded: tuple[Any, Any]) -> None:
    """`graph_warmup`: no step captures a bucket while serving (the streams would wait)."""
    engine = make_engine(loaded, static_decode_on_cpu=True, graph_batch_sizes=(1, 2, 4))
    try:
        graphs = engine.graphs
        assert graphs is not None
        max_vision = engine.batcher.cache.geometry.max_vision_tokens
        # Rows 1, 2, 4 and all 6 slots; kv 256 and the whole slot (512); vision or not.
        want = [
            (rows, kv, vision)
            for rows in (1, 2, 4, 6)
            for kv in (256, 512)
            for vision in (0, max_vision)
        ]
        assert graphs.captured == sorted(want) == sorted(graphs.all_buckets())
        reqs = [request(TEXTS[0], rid="w-t0"), request("Colour?", image(RED), rid="w-i0")]
        texts = asyncio.run(together(engine, reqs))
        assert graphs.replays > 0
        assert graphs.captured == sorted(want)  # nothing new while serving
        for req, text in zip(reqs, texts, strict=True):
            assert_matches_reference(engine, loaded, req, text)
    finally:
        asyncio.run(engine.stop())


def test_failed_graph_warmup_falls_back_to_eager_decode(loaded: tuple[Any, Any]) -> None:
    """A decode step that cannot be compiled (or captured) at start: the engine logs it, says
    why, and serves eagerly with the same tokens instead of failing to start."""

    def refusing_compiler(graph: Any, example_inputs: Any) -> Any:
        raise NotImplementedError("this compiler takes nothing")

    torch._dynamo.reset()  # a fresh cache: the decode step really goes to this compiler
    torch._dynamo.register_backend(refusing_compiler, name="test_refusing_compiler")
    engine = make_engine(
        loaded,
        static_decode_on_cpu=True,
        compile_decode=True,
        compile_backend="test_refusing_compiler",
    )
    try:
        assert engine.graphs is None and engine.batcher.graphs is None
        assert (
            engine.graph_error is not None and "this compiler takes nothing" in engine.graph_error
        )
        req = request(TEXTS[0], rid="fallback")
        text, finished, _ = asyncio.run(run(engine, req))
        assert finished.reason in ("stop", "length")
        assert_matches_reference(engine, loaded, req, text)
    finally:
        asyncio.run(engine.stop())


@torch.inference_mode()
def test_decode_traces_as_one_graph(forward: FastForward, loaded: tuple[Any, Any]) -> None:
    """No graph break in a decode step (a break is where a host sync or data-dependent Python
    would be, which a CUDA graph cannot hold), and the traced step writes the cache as eager."""
    inputs = encode(loaded, "What is in this picture?", image(GREEN))
    _, mask = prefill(forward, 0, inputs)
    forward.cache.set_vision_mask(0, mask)
    n_prompt = inputs["input_ids"].shape[1]
    step = make_decode_inputs(
        forward.cache,
        {0: (7, n_prompt)},
        n=2,
        kv_len=256,
        vision_len=forward.cache.geometry.max_vision_tokens,
    )
    layer = min(forward.cache.self_k)
    column = forward.cache.self_k[layer][0, :, n_prompt]
    want = forward.decode(step)
    written = column.clone()
    column.zero_()
    traced = torch.compile(forward.decode, fullgraph=True, dynamic=False, backend="aot_eager")
    got = traced(step)
    assert torch.allclose(got, want, atol=1e-5)
    assert written.abs().sum() > 0
    assert torch.equal(column, written)


def test_compiled_buckets_past_dynamos_recompile_limit(forward: FastForward) -> None:
    """More buckets than dynamo's default recompile limit (8), compiled from another thread
    than the one that built the graphs (as the engine's worker does; dynamo's config is
    thread-local): every bucket compiles, none fails or falls back."""
    graphs = DecodeGraphs(
        forward,
        batch_sizes=(1, 2, 3, 4),
        min_kv_len=16,
        compile_decode=True,
        compile_backend="aot_eager",
        capture=False,
    )
    keys = [graphs.bucket(rows, kv, 0) for rows in (1, 2, 3, 4) for kv in (16, 32, 64)]
    errors: list[BaseException] = []

    def warm() -> None:
        try:
            with torch.inference_mode():
                graphs.warmup(keys)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=warm)
    worker.start()
    worker.join()
    assert errors == []
    assert graphs.captured == sorted(keys) and len(keys) > 8
    step = make_decode_inputs(forward.cache, {0: (3, 5)}, n=4, kv_len=64, vision_len=0)
    other = make_decode_inputs(forward.cache, {0: (3, 5)}, n=1, kv_len=16, vision_len=0)
    with torch.inference_mode():
        got = graphs.run(step)
        assert torch.allclose(got, forward.decode(step), atol=1e-5)
        # Every bucket leaves its logits in the first rows of one shared buffer.
        again = graphs.run(other)
        assert again.data_ptr() == got.data_ptr() and again.shape[0] == 1
        assert torch.allclose(again, forward.decode(other), atol=1e-5)
