"""The batch engine: Llama 3.2-Vision through transformers' forward, with a batching scheduler.

Loading, the prompt encoder, grammars and token counting are `model.mllama_base`'s (shared with
the fast engine); this module adds the scheduler that runs batches through `MllamaRunner`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from model.engine import EngineEvent, EngineInfo, EngineRequest, Finished
from model.errors import EngineError
from model.mllama_base import MllamaEngineBase
from model.runner import MllamaRunner
from model.scheduler import BatchScheduler, queue_emitter

log = structlog.get_logger(__name__)


class LocalMllamaEngine(MllamaEngineBase):
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
        super().__init__(model_path, model_id=model_id, device=device)
        self._max_batch = max_batch_size
        self._context_override = context_length
        self._scheduler: BatchScheduler | None = None
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
        self._load_checkpoint()
        self._context_length = self._context_override or self._max_positions()
        runner = MllamaRunner(self._model, self.encoder.pad_id, self._device)
        eos = self._end_tokens()
        self._build_grammars(runner.vocab_size, eos)
        self._scheduler = BatchScheduler(
            runner, self.encoder, eos, self._max_batch, self._token_bytes()
        )
        self._scheduler.start()

    async def stop(self) -> None:
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)

    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def info(self) -> EngineInfo:
        return self._engine_info(
            context_length=self._context_length, max_batch_size=self._max_batch
        )

    @property
    def scheduler(self) -> BatchScheduler:
        if self._scheduler is None:
            raise EngineError("the engine is not loaded yet")
        return self._scheduler

    # -- requests --------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        scheduler = self.scheduler
        prompt, images = self.encoder.render(request.messages, request.tools_json)
        grammar = await self._grammar(request)
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
