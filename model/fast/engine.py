"""`FastMllamaEngine`: the `Engine` interface over the fast forward and continuous batching.

Loading, the prompt encoder, grammars and token counting are `model.mllama_base`'s (shared with
the batch engine); only the decode loop is ours. The static caches are sized once at start from
a memory budget. The event loop never waits on the model: the processor runs in a thread
(`asyncio.to_thread`), the model in the batcher's worker thread, and events come back through
an `asyncio.Queue`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import structlog
import torch
from PIL.Image import Image

from model.engine import EngineEvent, EngineInfo, EngineRequest, Finished
from model.errors import EngineError, InputRejected
from model.fast.config import FastEngineConfig
from model.fast.continuous_batcher import ContinuousBatcher
from model.fast.forward import FastForward
from model.fast.graphs import DecodeGraphs
from model.fast.kv_cache import CacheGeometry, ImageStateCache, StaticKVCache, plan_slots
from model.fast.sampling import SlotSampler
from model.fast.sequence import PreparedImages
from model.mllama_base import MllamaEngineBase
from model.scheduler import queue_emitter

log = structlog.get_logger(__name__)


def image_key(image: Image) -> bytes:
    """A content hash of a decoded image (mode, size and pixels)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


class FastMllamaEngine(MllamaEngineBase):
    """`Engine` over a local Mllama checkpoint: static slots, continuous batching."""

    def __init__(
        self,
        model_path: Path | None,
        *,
        model_id: str,
        device: str = "auto",
        config: FastEngineConfig | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        super().__init__(model_path, model_id=model_id, device=device, eos_token_ids=eos_token_ids)
        self.config = config or FastEngineConfig()
        self._batcher: ContinuousBatcher | None = None
        self._graphs: DecodeGraphs | None = None
        self._slots = 0
        self._graph_warmup_s = 0.0
        # Why the decode graphs are off although configured (their capture failed at start).
        self.graph_error: str | None = None
        self._max_len = self.config.max_len

    @classmethod
    def from_loaded(
        cls,
        model: Any,
        processor: Any,
        *,
        model_id: str,
        config: FastEngineConfig | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ) -> FastMllamaEngine:
        """An engine over an already loaded model and processor (tests, benchmarks)."""
        engine = cls(None, model_id=model_id, config=config, eos_token_ids=eos_token_ids)
        engine._adopt(model, processor)
        return engine

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        log.info(
            "engine_ready",
            engine="fast",
            device=str(self._device),
            dtype=str(self._dtype),
            slots=self._slots,
            max_len=self._max_len,
            graphs=len(self._graphs.captured) if self._graphs is not None else 0,
            graph_warmup_s=round(self._graph_warmup_s, 1),
        )

    def _load(self) -> None:
        self._load_checkpoint()
        model = self._model
        self._max_len = min(self.config.max_len, self._max_positions())
        geometry = CacheGeometry.from_model(
            model,
            max_len=self._max_len,
            max_images=self.config.max_images_per_request,
            dtype=self._dtype,
        )
        budget = self._budget()
        slots = plan_slots(geometry, budget, self.config.max_slots)
        if slots < 1:
            raise EngineError(
                f"a cache budget of {budget} bytes pays for no slot "
                f"({geometry.bytes_per_slot} bytes each): lower max_len or raise the budget"
            )
        cache = StaticKVCache(geometry, slots, self._device)
        forward = FastForward(model, cache)
        on_cuda = self._device.type == "cuda"
        if (on_cuda and self.config.cuda_graphs) or (
            not on_cuda and self.config.static_decode_on_cpu
        ):
            self._graphs = DecodeGraphs(
                forward,
                batch_sizes=self.config.graph_batch_sizes,
                min_kv_len=self.config.graph_min_kv_len,
                compile_decode=self.config.compile_decode,
                compile_backend=self.config.compile_backend,
                capture=on_cuda,
            )
        if self._graphs is not None and self.config.graph_warmup:
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._graphs.warmup(self._graphs.all_buckets())
            except Exception as exc:  # serve on, eagerly: slower, not down
                log.exception("decode_graphs_failed", captured=len(self._graphs.captured))
                self.graph_error = f"{type(exc).__name__}: {exc}"
                self._graphs = None
            self._graph_warmup_s = time.perf_counter() - started
        image_cache = None
        if self.config.image_cache_bytes > 0:
            image_cache = ImageStateCache(self.config.image_cache_bytes)
        eos = self._end_tokens()
        self._batcher = ContinuousBatcher(
            forward,
            cache,
            SlotSampler(slots, geometry.vocab_size, self._device),
            self.encoder.tokenizer,
            eos,
            self.config,
            image_cache=image_cache,
            graphs=self._graphs,
            token_bytes=self._token_bytes(),
        )
        self._build_grammars(geometry.vocab_size, eos)
        self._slots = slots
        self._batcher.start()

    def _budget(self) -> int:
        if self.config.memory_budget_bytes is not None:
            return self.config.memory_budget_bytes
        if self._device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self._device)
            return (
                int(free * self.config.gpu_memory_fraction) - self.config.activation_reserve_bytes
            )
        return self.config.cpu_budget_bytes

    async def stop(self) -> None:
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)

    def ready(self) -> bool:
        return self._batcher is not None

    @property
    def info(self) -> EngineInfo:
        return self._engine_info(
            context_length=self._max_len,
            max_batch_size=self._slots,
            extra={
                "engine": "fast",
                "slots": str(self._slots),
                "cuda_graphs": str(self._graphs is not None and self._graphs.capture).lower(),
            },
        )

    @property
    def batcher(self) -> ContinuousBatcher:
        if self._batcher is None:
            raise EngineError("the engine is not loaded yet")
        return self._batcher

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self._graphs

    # -- requests ----------------------------------------------------------------------------
    def prepare(
        self, prompt: str, images: list[Image]
    ) -> tuple[torch.Tensor, torch.Tensor | None, PreparedImages | None]:
        """Token ids, per-token tile mask and image tensors of one templated prompt (CPU)."""
        encoded = self.encoder.encode(prompt, images)
        input_ids = encoded.input_ids
        if encoded.images is None:
            return input_ids, None, None
        feats = encoded.images
        tiles = [int(n) for n in feats.aspect_ratio_mask.sum(dim=-1).tolist()]
        dense = feats.cross_attention_mask  # [T, images, max_tiles]
        # Real tiles only, images in order: the layout of the slot's cross-attention K/V.
        tile_mask = torch.cat([dense[:, i, :n] for i, n in enumerate(tiles)], dim=1).bool()
        prepared = PreparedImages(
            pixel_values=feats.pixel_values[None],
            aspect_ratio_ids=feats.aspect_ratio_ids[None],
            aspect_ratio_mask=feats.aspect_ratio_mask[None],
            keys=[image_key(img) for img in images],
        )
        return input_ids, tile_mask, prepared

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream text deltas, then one `Finished`; raises `EngineOverloaded` when full,
        `RequestNeverFits` when it could never fit."""
        batcher = self.batcher
        prompt, images = self.encoder.render(request.messages, request.tools_json)
        try:
            input_ids, tile_mask, prepared = await asyncio.to_thread(self.prepare, prompt, images)
        except InputRejected as exc:  # an image the processor cannot take: the request's fault
            log.warning("request_input_rejected", request_id=request.request_id, reason=str(exc))
            yield Finished("error", 0, 0, str(exc), fault="request")
            return
        except Exception as exc:
            log.exception("fast_prepare_failed", request_id=request.request_id)
            yield Finished("error", 0, 0, f"{type(exc).__name__}: {exc}")
            return
        grammar = await self._grammar(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        seq = batcher.new_sequence(
            request,
            input_ids,
            queue_emitter(loop, queue),
            tile_mask=tile_mask,
            images=prepared,
            grammar=grammar,
        )
        batcher.submit(seq)  # EngineOverloaded or RequestNeverFits goes to the caller
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # Client gone, generator closed or task cancelled: free the slot at the next step.
            if not seq.done:
                batcher.cancel(seq)
