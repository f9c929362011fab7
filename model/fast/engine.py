"""`FastMllamaEngine`: the `Engine` interface over the fast forward and continuous batching.

Loading is unchanged (`AutoProcessor` and `MllamaForConditionalGeneration.from_pretrained`, bf16
on CUDA, float32 on the CPU); only the decode loop is ours. The static caches are sized once at
start from a memory budget. The event loop never waits on the model: the processor runs in a
thread (`asyncio.to_thread`), the model in the batcher's worker thread, and events come back
through an `asyncio.Queue`.
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

from model.encoding import PromptEncoder
from model.engine import EngineEvent, EngineInfo, EngineRequest, Finished
from model.errors import EngineError, InputRejected
from model.fast.config import FastEngineConfig
from model.fast.continuous_batcher import ContinuousBatcher
from model.fast.forward import FastForward
from model.fast.graphs import DecodeGraphs
from model.fast.kv_cache import CacheGeometry, ImageStateCache, StaticKVCache, plan_slots
from model.fast.sampling import SlotSampler
from model.fast.sequence import PreparedImages
from model.grammar import GrammarBook
from model.local_engine import eos_ids, pick_device
from model.logprobs import TokenBytes
from model.prompt import PromptRenderer
from model.scheduler import queue_emitter

log = structlog.get_logger(__name__)


def image_key(image: Image) -> bytes:
    """A content hash of a decoded image (mode, size and pixels)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


class FastMllamaEngine:
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
        self._path = Path(model_path) if model_path is not None else None
        self._model_id = model_id
        self._device = pick_device(device)
        self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self.config = config or FastEngineConfig()
        self._eos_override = None if eos_token_ids is None else set(eos_token_ids)
        self._processor: Any = None
        self._model: Any = None
        self._encoder: PromptEncoder | None = None
        self._grammars: GrammarBook | None = None
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
        param = next(model.parameters())
        engine = cls(None, model_id=model_id, config=config, eos_token_ids=eos_token_ids)
        engine._device, engine._dtype = param.device, param.dtype
        engine._model, engine._processor = model, processor
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
        if self._model is None:
            from transformers import AutoProcessor, MllamaForConditionalGeneration

            if self._path is None:
                raise EngineError("no model path and no loaded model")
            processor = AutoProcessor.from_pretrained(self._path)
            model = MllamaForConditionalGeneration.from_pretrained(self._path, dtype=self._dtype)
            self._model = model.to(self._device).eval()  # type: ignore[arg-type]
            self._processor = processor
        model, processor = self._model, self._processor
        # The one owner of the processor: every tokenizer call (counting in request threads,
        # encoding in `prepare`) goes through it (a shared fast tokenizer is not thread-safe).
        self._encoder = PromptEncoder(processor)
        text = model.config.get_text_config(decoder=True)
        self._max_len = min(self.config.max_len, int(text.max_position_embeddings))
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
        eos = self._eos_override if self._eos_override is not None else eos_ids(processor, model)
        self._batcher = ContinuousBatcher(
            forward,
            cache,
            SlotSampler(slots, geometry.vocab_size, self._device),
            processor.tokenizer,
            eos,
            self.config,
            image_cache=image_cache,
            graphs=self._graphs,
            token_bytes=TokenBytes(processor.tokenizer, lambda: self.grammars.decoded_vocab),
        )
        self._grammars = GrammarBook(processor.tokenizer, geometry.vocab_size, eos)
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
        return EngineInfo(
            model_id=self._model_id,
            context_length=self._max_len,
            max_batch_size=self._slots,
            device=str(self._device),
            dtype=str(self._dtype).removeprefix("torch."),
            extra={
                "engine": "fast",
                "slots": str(self._slots),
                "cuda_graphs": str(self._graphs is not None and self._graphs.capture).lower(),
            },
            image_placeholder_usage=True,
        )

    @property
    def batcher(self) -> ContinuousBatcher:
        if self._batcher is None:
            raise EngineError("the engine is not loaded yet")
        return self._batcher

    @property
    def grammars(self) -> GrammarBook:
        if self._grammars is None:
            raise EngineError("the engine is not loaded yet")
        return self._grammars

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            raise EngineError("the engine is not loaded yet")
        return self._encoder

    @property
    def renderer(self) -> PromptRenderer:
        return self.encoder.renderer

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def model(self) -> Any:
        return self._model

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self._graphs

    # -- requests ----------------------------------------------------------------------------
    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.encoder.count(request.messages, request.tools_json)

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
        schema = request.sampling.json_schema
        # Compiling a new schema takes milliseconds to seconds: never on the worker's thread.
        grammar = await asyncio.to_thread(self.grammars.row, schema) if schema else None
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
