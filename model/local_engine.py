"""The local engine: Llama 3.2-Vision through transformers, loaded from a local directory.

Loading goes through `AutoProcessor.from_pretrained(path)` and
`MllamaForConditionalGeneration.from_pretrained(path)`: the same code for the demo model and for
real weights. bf16 on CUDA, float32 on the CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
import torch

from model.encoding import PromptEncoder
from model.engine import EngineEvent, EngineInfo, EngineRequest, Finished
from model.errors import EngineError
from model.grammar import GrammarBook
from model.logprobs import TokenBytes
from model.prompt import PromptRenderer
from model.runner import MllamaRunner
from model.scheduler import BatchScheduler, queue_emitter

log = structlog.get_logger(__name__)

END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def eos_ids(processor: Any, model: Any) -> set[int]:
    """Token ids that end a completion: Llama's end tokens and the generation config's."""
    tokenizer = processor.tokenizer
    eos = {tid for t in END_TOKENS if (tid := tokenizer.convert_tokens_to_ids(t)) is not None}
    eos.discard(tokenizer.unk_token_id)
    gen_eos = model.generation_config.eos_token_id
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
    return eos


def pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class LocalMllamaEngine:
    """`Engine` over a local Mllama checkpoint with a batching scheduler."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_id: str,
        device: str = "auto",
        max_batch_size: int = 8,
        context_length: int | None = None,
    ) -> None:
        self._path = Path(model_path)
        self._model_id = model_id
        self._device = pick_device(device)
        self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self._max_batch = max_batch_size
        self._context_override = context_length
        self._processor: Any = None
        self._model: Any = None
        self._scheduler: BatchScheduler | None = None
        self._encoder: PromptEncoder | None = None
        self._grammars: GrammarBook | None = None
        self._context_length = context_length or 0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        log.info(
            "engine_ready",
            model=str(self._path),
            device=str(self._device),
            dtype=str(self._dtype),
            context_length=self._context_length,
        )

    def _load(self) -> None:
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(self._path)
        model = MllamaForConditionalGeneration.from_pretrained(self._path, dtype=self._dtype)
        model = model.to(self._device).eval()  # type: ignore[arg-type]
        text_config = model.config.get_text_config(decoder=True)
        self._context_length = self._context_override or int(text_config.max_position_embeddings)
        # The one owner of the processor: request threads count through it while the
        # scheduler thread encodes batches (a shared fast tokenizer is not thread-safe).
        encoder = PromptEncoder(processor)
        runner = MllamaRunner(model, encoder.pad_id, self._device)
        eos = eos_ids(processor, model)
        self._grammars = GrammarBook(processor.tokenizer, runner.vocab_size, eos)
        self._scheduler = BatchScheduler(
            runner,
            encoder,
            eos,
            self._max_batch,
            TokenBytes(processor.tokenizer, lambda: self.grammars.decoded_vocab),
        )
        self._processor, self._model, self._encoder = processor, model, encoder
        self._scheduler.start()

    async def stop(self) -> None:
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)

    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id=self._model_id,
            context_length=self._context_length,
            max_batch_size=self._max_batch,
            device=str(self._device),
            dtype=str(self._dtype).removeprefix("torch."),
            image_placeholder_usage=True,
        )

    @property
    def scheduler(self) -> BatchScheduler:
        if self._scheduler is None:
            raise EngineError("the engine is not loaded yet")
        return self._scheduler

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

    # -- requests --------------------------------------------------------------------------
    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.encoder.count(request.messages, request.tools_json)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        scheduler = self.scheduler
        prompt, images = self.encoder.render(request.messages, request.tools_json)
        schema = request.sampling.json_schema
        # Compiling a new schema takes milliseconds to seconds: never on the scheduler's thread.
        grammar = await asyncio.to_thread(self.grammars.row, schema) if schema else None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        seq = scheduler.new_sequence(request, prompt, images, queue_emitter(loop, queue), grammar)
        scheduler.submit(seq)
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # Client gone, generator closed or task cancelled: free the batch slot.
            if not seq.done:
                scheduler.cancel(seq)
