"""Settings of the fast engine (sizes, budgets and scheduling knobs)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class FastEngineConfig:
    # Context of one slot (prompt + completion); also the engine's `context_length`.
    max_len: int = 4096
    # Upper bound on slots, whatever the budget pays for.
    max_slots: int = 64
    # Bytes for the static caches. None: on CUDA, `gpu_memory_fraction` of the memory free after
    # loading, minus `activation_reserve_bytes`; on the CPU, `cpu_budget_bytes`.
    memory_budget_bytes: int | None = None
    gpu_memory_fraction: float = 0.9
    # Left free for activations: prefill chunks, the vision encoder, CUDA graph pools.
    activation_reserve_bytes: int = 6 * GIB
    cpu_budget_bytes: int = 1 * GIB
    # Images one request may carry (each up to max_num_tiles tiles, room reserved per slot).
    max_images_per_request: int = 1
    # Prompt tokens prefilled per step, over at most `max_prefill_seqs` requests: a long prompt
    # takes several steps, and running streams get a decode step between its chunks.
    prefill_chunk_tokens: int = 512
    max_prefill_seqs: int = 8
    # Tiles through the vision encoder per step (at least one request's images).
    vision_tiles_per_step: int = 8
    # Requests that may wait for a slot; beyond that `generate` raises EngineOverloaded.
    max_waiting: int = 256
    # Projected vision states kept by image hash (0 disables the cache).
    image_cache_bytes: int = 1 * GIB
    # CUDA graphs for the decode step, optionally compiled (on the CPU only with
    # `static_decode_on_cpu`, which runs the same buckets without capture).
    cuda_graphs: bool = True
    compile_decode: bool = False
    compile_backend: str = "inductor"  # tests use "aot_eager" (traced, no code generation)
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    graph_min_kv_len: int = 256
    # Capture every bucket at start (a few seconds eager; one compile each with
    # compile_decode): else a step that lands in a new bucket captures it on the spot, and
    # the streams in that step wait for it.
    graph_warmup: bool = True
    # Off CUDA: run the CUDA-graph path's buckets and static buffers anyway, without capture
    # (tests of that path on machines without a GPU).
    static_decode_on_cpu: bool = False

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError("max_len must be at least 2")
        if self.prefill_chunk_tokens < 1 or self.max_prefill_seqs < 1:
            raise ValueError("prefill_chunk_tokens and max_prefill_seqs must be positive")
        if self.max_images_per_request < 0 or self.max_waiting < 0:
            raise ValueError("max_images_per_request and max_waiting must not be negative")
