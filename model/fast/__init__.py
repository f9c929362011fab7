"""The fast engine: our own decode loop over the transformers Mllama modules.

- `kv_cache`: static self-attention K/V split into slots, per-slot cross-attention K/V (real
  tiles only), sized once from a memory budget; an LRU of vision states by image hash.
- `forward`: prefill chunks and decode steps with our attention over that cache, and the
  cross-attention row-mask fix of huggingface/transformers#39379.
- `sampling`: per-slot temperature/top_p/seed/penalties, vectorised on the device.
- `batching`: continuous batching in a worker thread (chunked prefill interleaved with decode,
  image and text requests in one batch).
- `graphs`: CUDA graphs for the decode step (GPU only, untested without a GPU).
- `engine`: `FastMllamaEngine`, the `model.engine.Engine` interface.
"""

from model.fast.config import FastEngineConfig
from model.fast.engine import FastMllamaEngine

__all__ = ["FastEngineConfig", "FastMllamaEngine"]
