"""Batching scheduler: one worker thread drives the model; the event loop only waits on queues.

Requests that arrive while the model is busy queue up and run together in the next batch (up to
`max_batch_size`), each streaming its own tokens. Image requests and text-only requests never
share a batch: transformers applies Mllama's cross-attention row mask only after the MLP
(huggingface/transformers#39379), so a text-only row batched with image rows would answer
differently than alone. A cancelled request is dropped from its batch at the next step.

One request never fails its batch-mates: each row is encoded on its own (a row the processor
refuses fails alone, as the request's fault), and when a batch fails in the model, its rows that
have not streamed anything yet are run again one by one, so that only the guilty row fails.

The interface (`submit`, `start`, `stop`, `active_count`) is what a continuous-batching engine
will keep when it replaces the inside.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import structlog
import torch
from PIL.Image import Image

from model.detokenizer import IncrementalDetokenizer, finish_stream
from model.encoding import EncodedPrompt, PromptEncoder
from model.engine import EngineEvent, EngineRequest, Fault, FinishReason, TextDelta, TokenLogprob
from model.errors import InputRejected
from model.grammar import RowGrammar, mask_rows
from model.logprobs import TokenBytes, token_logprob
from model.runner import MllamaRunner
from model.sampling import TokenSampler
from model.worker_thread import WorkerThread

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class ScheduledRequest:
    """One request's life in the scheduler."""

    request: EngineRequest
    prompt: str
    images: list[Image]
    emit: Callable[[EngineEvent], None]
    sampler: TokenSampler
    detok: IncrementalDetokenizer
    encoded: EncodedPrompt | None = None  # set by the worker before the row's first batch
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: bool = False
    done: bool = False
    finish_reason: FinishReason | None = field(default=None)
    grammar: RowGrammar | None = None
    # Logprobs of tokens whose text the detokenizer has not released yet.
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    def finish(
        self, reason: FinishReason, error: str | None = None, fault: Fault = "server"
    ) -> None:
        finish_stream(self, reason, error, fault, logprobs=self.take_logprobs())

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        taken = tuple(self.pending_logprobs)
        self.pending_logprobs.clear()
        return taken


def queue_emitter(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[EngineEvent]
) -> Callable[[EngineEvent], None]:
    """An emit function safe to call from the worker thread."""

    def emit(event: EngineEvent) -> None:
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return emit


class BatchScheduler(WorkerThread[ScheduledRequest]):
    thread_name = "mllama-scheduler"

    def __init__(
        self,
        runner: MllamaRunner,
        encoder: PromptEncoder,
        eos_token_ids: Iterable[int],
        max_batch_size: int,
        token_bytes: TokenBytes | None = None,
    ) -> None:
        super().__init__()
        self._runner = runner
        self._encoder = encoder
        # Decoding only reads the tokenizer (encoding.py: its state never changes after start).
        self._decoder = encoder.tokenizer
        self._token_bytes = token_bytes
        self._eos = frozenset(eos_token_ids)
        self._max_batch = max(1, max_batch_size)
        self._pending: deque[ScheduledRequest] = deque()
        self._active: list[ScheduledRequest] = []
        self.batches_run = 0
        self.last_batch_size = 0

    # -- interface -----------------------------------------------------------------------
    def new_sequence(
        self,
        request: EngineRequest,
        prompt: str,
        images: list[Image],
        emit: Callable[..., None],
        grammar: RowGrammar | None = None,
    ) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            prompt=prompt,
            images=images,
            emit=emit,
            sampler=TokenSampler(request.sampling, self._runner.vocab_size),
            detok=IncrementalDetokenizer(self._decoder, request.sampling.stop),
            grammar=grammar,
        )

    def submit(self, seq: ScheduledRequest) -> None:
        with self._cond:
            if self._stopping:
                seq.finish("error", "the engine is shutting down")
                return
            self._pending.append(seq)
            self._cond.notify()

    @property
    def active_count(self) -> int:
        """Requests currently in a running batch."""
        return sum(1 for s in self._active if not s.done)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    # -- worker --------------------------------------------------------------------------
    def _requests(self) -> list[ScheduledRequest]:
        return list(self._pending) + self._active

    def _take_batch(self) -> list[ScheduledRequest] | None:
        with self._cond:
            while True:
                for seq in [s for s in self._pending if s.cancelled]:
                    self._pending.remove(seq)
                    seq.finish("cancelled")
                if self._stopping:
                    return None
                if self._pending:
                    break
                self._cond.wait()
            # FIFO by kind: the oldest request decides whether this is an image batch.
            kind = self._pending[0].has_images
            batch = [s for s in self._pending if s.has_images == kind][: self._max_batch]
            for seq in batch:
                self._pending.remove(seq)
            self._active = batch
            self.last_batch_size = len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                self._run_isolated(self._encode(batch))
            finally:
                self._active = []
                self.batches_run += 1
        with self._cond:
            for seq in list(self._pending):
                seq.finish("cancelled")
            self._pending.clear()

    def _encode(self, batch: list[ScheduledRequest]) -> list[ScheduledRequest]:
        """Encode each row on its own; a row that cannot be encoded fails alone."""
        ready: list[ScheduledRequest] = []
        for seq in batch:
            if seq.encoded is None:
                try:
                    seq.encoded = self._encoder.encode(seq.prompt, seq.images)
                except InputRejected as exc:
                    log.warning(
                        "request_input_rejected",
                        request_id=seq.request.request_id,
                        reason=str(exc),
                        cause=repr(exc.__cause__) if exc.__cause__ else None,
                    )
                    seq.finish("error", str(exc), fault="request")
                    continue
                except Exception as exc:
                    log.exception("request_encoding_failed", request_id=seq.request.request_id)
                    seq.finish("error", f"{type(exc).__name__}: {exc}")
                    continue
            ready.append(seq)
        return ready

    def _run_isolated(self, batch: list[ScheduledRequest]) -> None:
        """Run a batch; if it fails, run its untouched rows alone so only the guilty one fails."""
        if not batch:
            return
        try:
            self._run(batch)
            return
        except Exception as exc:
            log.exception(
                "batch_failed",
                size=len(batch),
                request_ids=[s.request.request_id for s in batch],
            )
            error = f"{type(exc).__name__}: {exc}"
        # Rows that streamed text cannot start over (the client has it): they fail. The others
        # have seen nothing yet and are retried alone, unless this was already a batch of one.
        retry = [s for s in batch if not s.done and s.completion_tokens == 0 and len(batch) > 1]
        for seq in batch:
            if not seq.done and seq not in retry:
                seq.finish("error", error)
        for seq in retry:
            try:
                self._run([seq])
            except Exception as exc:
                log.exception("sequence_failed", request_id=seq.request.request_id)
                seq.finish("error", f"{type(exc).__name__}: {exc}")

    def _run(self, batch: list[ScheduledRequest]) -> None:
        rows = [s.encoded for s in batch]
        if any(r is None for r in rows):
            raise RuntimeError("a row reached the model without being encoded")
        logits, state = self._runner.prefill(cast(list[EncodedPrompt], rows))
        for seq, n in zip(batch, state.prompt_tokens, strict=True):
            seq.prompt_tokens = n
        active = batch
        while active:
            if any(s.grammar is not None for s in active):
                with torch.inference_mode():  # the logits are inference tensors
                    mask_rows([s.grammar for s in active], logits, self._runner.vocab_size)
            keep: list[int] = []
            tokens: list[int] = []
            for row, seq in enumerate(active):
                try:
                    token = self._step(seq, logits[row])
                except Exception as exc:  # one request's failure must not fail its batch
                    log.exception("sequence_failed", request_id=seq.request.request_id)
                    seq.finish("error", f"{type(exc).__name__}: {exc}")
                    token = None
                if token is not None:
                    keep.append(row)
                    tokens.append(token)
            if not keep:
                return
            if len(keep) < len(active):
                self._runner.keep(state, keep)
                active = [active[i] for i in keep]
            logits = self._runner.decode(state, tokens)

    def _step(self, seq: ScheduledRequest, logits: torch.Tensor) -> int | None:
        """Sample one token for `seq`; return it if the sequence goes on, else None."""
        if seq.cancelled:
            seq.finish("cancelled")
            return None
        scores = seq.sampler.scores(logits)
        token = seq.sampler.choose(scores)
        seq.completion_tokens += 1
        seq.sampler.observe(token)
        if seq.grammar is not None and not seq.grammar.accept(token):
            seq.finish("error", f"token {token} is outside the response format's grammar")
            return None
        if token in self._eos:
            seq.finish("stop")
            return None
        top = seq.request.sampling.top_logprobs
        if top is not None and self._token_bytes is not None:
            seq.pending_logprobs.append(token_logprob(scores, token, top, self._token_bytes))
        delta = seq.detok.add(token)
        if delta:
            seq.emit(TextDelta(delta, seq.take_logprobs()))
        if seq.detok.stopped:
            seq.finish("stop")
            return None
        if seq.completion_tokens >= seq.request.sampling.max_tokens:
            seq.finish("length")
            return None
        return token
