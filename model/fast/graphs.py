"""CUDA graphs for the decode step.  The capture itself is GPU only and was written without a
GPU: run `bench/engine_gpu.py` on one before trusting it (its "graph decode vs eager" row); if
it fails, set `cuda_graphs=False` (eager decode). Everything around the capture (buckets, idle
rows, static input buffers) also runs on the CPU with `capture=False`, where each "replay" is a
plain call on the static buffers; the tests run the engine that way
(`FastEngineConfig.static_decode_on_cpu`).

At batch 1 an 11B decode step is hundreds of kernels (`bench/engine_ops.py`; counts in
bench/NOTES.md), and launching them from Python costs more than running them. A graph per shape
bucket replays them in one launch.
Shapes are bucketed so a handful of graphs cover all steps: rows `n` round up to
`graph_batch_sizes` (extra rows are idle: they write to the scratch column and are discarded),
`kv_len` to a power of two (at least `graph_min_kv_len`, at most `max_len`), and the vision
length is either 0 (no row sees an image: cross-attention layers skipped) or the slot's full
vision capacity (rows masked).

`compile_decode` additionally runs the decode function through `torch.compile` (static shapes,
`fullgraph`) before capture: inductor fuses the elementwise work between the GEMMs (residual
adds, rotary, SiLU x up); each bucket then compiles once (tens of seconds per shape on 11B,
so warm up the buckets you need at start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from model.fast.forward import DecodeInputs, FastForward, make_decode_inputs


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: not captured (`capture=False`), called instead
    inputs: DecodeInputs  # static buffers the graph reads
    logits: torch.Tensor  # where the graph leaves its logits: rows of the shared buffer


class DecodeGraphs:
    def __init__(
        self,
        forward: FastForward,
        *,
        batch_sizes: tuple[int, ...],
        min_kv_len: int,
        compile_decode: bool = False,
        compile_backend: str = "inductor",
        capture: bool = True,
    ) -> None:
        if capture and forward.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.capture = capture
        self.forward = forward
        geometry = forward.cache.geometry
        slots = forward.cache.slots
        self.batch_sizes = sorted({b for b in batch_sizes if b < slots} | {slots})
        # A decode step reads at most max_len columns (prompt + completion <= max_len, and the
        # token being fed is at most at max_len - 1); the scratch column is never read.
        self.max_kv = geometry.max_len
        self.min_kv = min(min_kv_len, self.max_kv)
        self.max_vision = geometry.max_vision_tokens
        self._fn: Callable[[DecodeInputs], torch.Tensor] = forward.decode
        self._compile_limits: dict[str, Any] = {}
        if compile_decode:
            # One compile per bucket (static shapes: the best kernels, and what a graph needs),
            # more than dynamo's default recompile limit (8). Dynamo's config is thread-local,
            # so the limits are applied around each call that may compile (`_call`).
            buckets = len(self.all_buckets())
            self._compile_limits = {
                "recompile_limit": max(8, buckets),
                "accumulated_recompile_limit": max(256, buckets),
            }
            # fullgraph: a graph break (a host sync, data-dependent Python) or going past the
            # limit fails loudly here rather than running eagerly or inside a capture.
            self._fn = torch.compile(
                forward.decode, dynamic=False, fullgraph=True, backend=compile_backend
            )
        self._graphs: dict[tuple[int, int, int], _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        # Every graph copies its logits into the first rows of this one buffer (outside the
        # pool), so no graph keeps an output alive in the shared pool: what a capture
        # allocates is free again when it ends, and the next capture reuses it (at 64 slots,
        # one logits tensor per graph would pin ~0.6 GB). Steps run one at a time, and the
        # caller consumes the logits before the next step.
        self._logits = torch.empty(
            self.batch_sizes[-1],
            forward.lm_head.out_features,
            dtype=torch.float32,
            device=forward.device,
        )
        self.replays = 0

    def bucket(self, n: int, kv_len: int, vision_len: int) -> tuple[int, int, int]:
        rows = next(b for b in self.batch_sizes if b >= n)
        length = self.min_kv
        while length < kv_len:
            length *= 2
        vision = self.max_vision if vision_len > 0 else 0
        return rows, min(length, self.max_kv), vision

    def all_buckets(self) -> list[tuple[int, int, int]]:
        """Every (rows, kv_len, vision_len) a decode step can land in."""
        lengths = [self.min_kv]
        while lengths[-1] < self.max_kv:
            lengths.append(min(lengths[-1] * 2, self.max_kv))
        visions = (0, self.max_vision) if self.max_vision > 0 else (0,)
        return [(b, kv, v) for b in self.batch_sizes for kv in lengths for v in visions]

    @property
    def captured(self) -> list[tuple[int, int, int]]:
        return sorted(self._graphs)

    def warmup(self, keys: list[tuple[int, int, int]]) -> None:
        """Capture these buckets now (else each is captured on first use)."""
        for key in keys:
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        key = (inputs.rows, inputs.kv_len, inputs.vision_len)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(*key)
        captured.inputs.ids.copy_(inputs.ids, non_blocking=True)
        self.replays += 1
        if captured.graph is None:
            captured.logits.copy_(self._call(captured.inputs))
        else:
            captured.graph.replay()
        # The buffer is overwritten by the next step: the caller consumes it before that.
        return captured.logits

    def _call(self, inputs: DecodeInputs) -> torch.Tensor:
        if not self._compile_limits:
            return self._fn(inputs)
        with torch._dynamo.config.patch(dict(self._compile_limits)):
            return self._fn(inputs)

    def _idle_inputs(self, rows: int, kv_len: int, vision: int) -> DecodeInputs:
        """Static buffers holding a step where every row is idle (safe to run at any time)."""
        return make_decode_inputs(self.forward.cache, {}, n=rows, kv_len=kv_len, vision_len=vision)

    def _capture(self, rows: int, kv_len: int, vision: int) -> _Captured:
        static = self._idle_inputs(rows, kv_len, vision)
        out = self._logits[:rows]
        if not self.capture:
            out.copy_(self._call(static))  # compiles now, as a capture would
            return _Captured(graph=None, inputs=static, logits=out)
        # Warm up on a side stream (cuBLAS handles, autotuning, compilation) before capture.
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop thread may touch CUDA (e.g. a tokenizer-free health
        # check) while the worker captures; only this thread's work is captured.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out.copy_(self._call(static))
        return _Captured(graph=graph, inputs=static, logits=out)
