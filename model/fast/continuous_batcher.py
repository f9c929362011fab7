"""Continuous batching: one worker thread steps every admitted request together.

Each step, in this order:

1. Reap: cancelled requests finish and give their slot back; waiting requests take free slots
   (FIFO). A request submitted while others decode joins at the next step, never waits for the
   batch to drain.
2. Decode: one token for every request past its prefill, in one `[n, 1]` forward over slots
   `0..n-1` (slots are handed out lowest first, so the busy ones are packed at the front).
3. Vision: the images of the oldest newcomers go through the encoder (at most
   `vision_tiles_per_step` tiles, at least one request's), unless their hash is cached; their
   cross-attention K/V are written into the slot once (`model.fast.vision_step`).
4. Prefill: the oldest newcomers' next prompt tokens in one right-padded forward of at most
   `prefill_chunk_tokens` (rows x widest chunk) and `max_prefill_seqs` rows. A long prompt
   thus takes several steps, each with a decode step of the others in between; a request
   whose prompt is complete samples its first token right away.

Image and text-only requests share the batch: the forward's cross-attention row gate makes a
text row's output independent of its neighbours (see `model.fast.forward`).

One request never fails the others: when the vision or prefill phase fails, the decoding rows go
on, and the newcomers (nothing streamed yet) restart, each prefilled with no other newcomer; one
that fails alone is the guilty one. A failed decode step fails only the rows it decoded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

import structlog
import torch

from model.detokenizer import Decoder, IncrementalDetokenizer
from model.engine import EngineEvent, EngineRequest, FinishReason, TextDelta
from model.errors import EngineOverloaded, RequestNeverFits
from model.fast.config import FastEngineConfig
from model.fast.constraints import SlotConstraints
from model.fast.forward import FastForward, PrefillChunk, make_decode_inputs
from model.fast.graphs import DecodeGraphs
from model.fast.kv_cache import ImageStateCache, StaticKVCache
from model.fast.sampling import SlotSampler
from model.fast.sequence import FastSequence, PreparedImages
from model.fast.vision_step import VisionStep
from model.grammar import RowGrammar
from model.logprobs import TokenBytes
from model.worker_thread import WorkerThread

log = structlog.get_logger(__name__)


class ContinuousBatcher(WorkerThread[FastSequence]):
    thread_name = "mllama-fast"

    def __init__(
        self,
        forward: FastForward,
        cache: StaticKVCache,
        sampler: SlotSampler,
        decoder: Decoder,
        eos_token_ids: Iterable[int],
        config: FastEngineConfig,
        *,
        image_cache: ImageStateCache | None = None,
        graphs: DecodeGraphs | None = None,
        token_bytes: TokenBytes | None = None,
    ) -> None:
        super().__init__()
        self.forward = forward
        self.cache = cache
        self.sampler = sampler
        self.decoder = decoder
        self.eos = frozenset(eos_token_ids)
        self.config = config
        self.image_cache = image_cache
        self.graphs = graphs
        self.constraints = SlotConstraints(sampler.vocab_size, self.eos, token_bytes)
        self.vision = VisionStep(forward, cache, config, image_cache)
        self._waiting: deque[FastSequence] = deque()
        self._running: list[FastSequence] = []  # slot holders, in admission order
        self._paused = False
        self.steps = 0
        self.max_running = 0
        self.tokens_out = 0  # sampled tokens, all requests (throughput: read between steps)
        self.decoded_rows = 0  # rows of the last decode step
        # Hooks for tests and metrics, called in the worker thread.
        self.on_step: Callable[[ContinuousBatcher], None] | None = None
        self.on_finish: Callable[[FastSequence], None] | None = None

    # -- interface -------------------------------------------------------------------------
    def new_sequence(
        self,
        request: EngineRequest,
        input_ids: torch.Tensor,
        emit: Callable[[EngineEvent], None],
        *,
        tile_mask: torch.Tensor | None = None,
        images: PreparedImages | None = None,
        grammar: RowGrammar | None = None,
    ) -> FastSequence:
        return FastSequence(
            request=request,
            emit=emit,
            detok=IncrementalDetokenizer(self.decoder, request.sampling.stop),
            input_ids=input_ids,
            tile_mask=tile_mask,
            images=images,
            grammar=grammar,
        )

    def check_fits(self, seq: FastSequence) -> None:
        """Raise `RequestNeverFits` when the request can never fit in a slot."""
        max_len = self.cache.geometry.max_len
        need = seq.prompt_tokens + seq.request.sampling.max_tokens
        if need > max_len:
            raise RequestNeverFits(
                f"the request needs {need} tokens of context; a slot holds {max_len}"
            )
        images = len(seq.images.keys) if seq.images is not None else 0
        if images > self.cache.geometry.max_images:
            raise RequestNeverFits(
                f"the request has {images} images; a slot holds {self.cache.geometry.max_images}"
            )

    def submit(self, seq: FastSequence) -> None:
        """Queue a request for the next step; raise `EngineOverloaded` when there is no room."""
        self.check_fits(seq)
        with self._cond:
            if self._stopping:
                seq.finish("error", "the engine is shutting down")
                return
            if len(self._waiting) >= self.cache.free_slots + self.config.max_waiting:
                raise EngineOverloaded(
                    f"all {self.cache.slots} slots are busy and {len(self._waiting)} requests "
                    "are waiting"
                )
            self._waiting.append(seq)
            self._cond.notify()

    def pause(self) -> None:
        """Hold the worker before its next step (requests still queue); `resume` lets it go.

        Lets a caller line several requests up for the same step (tests, benchmarks).
        """
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def active_count(self) -> int:
        """Requests holding a slot."""
        return sum(1 for s in self._running if not s.done)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    # -- worker ----------------------------------------------------------------------------
    def _requests(self) -> list[FastSequence]:
        return [*self._waiting, *self._running]

    def _work(self) -> None:
        with torch.inference_mode():  # thread-local: set in the worker itself
            while self._admit():
                try:
                    self._step()
                except Exception as exc:  # the decode step failed: its rows streamed text
                    log.exception("fast_step_failed", running=len(self._running))
                    for seq in [s for s in self._running if s.completion_tokens > 0]:
                        self._release(seq)
                        seq.finish("error", f"{type(exc).__name__}: {exc}")
                finally:
                    self.steps += 1
                    if self.on_step is not None:
                        self.on_step(self)
            with self._cond:
                for seq in [*self._waiting, *self._running]:
                    seq.finish("cancelled")
                self._waiting.clear()

    def _admit(self) -> bool:
        """Reap cancelled requests and fill free slots; wait for work. False: stop."""
        with self._cond:
            while True:
                for seq in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(seq)
                    seq.finish("cancelled")
                for seq in [s for s in self._running if s.cancelled]:
                    self._release_locked(seq)
                    seq.finish("cancelled")
                if self._stopping:
                    return False
                if self._paused:
                    self._cond.wait()
                    continue
                while self._waiting and self.cache.free_slots:
                    if not self._may_admit(self._waiting[0]):
                        break
                    seq = self._waiting.popleft()
                    slot = self.cache.allocate()
                    assert slot is not None
                    seq.slot = slot
                    seq.admitted_step = self.steps
                    seq.vision_ready = seq.images is None
                    self.cache.set_vision_mask(slot, None)
                    self.sampler.reset(slot, seq.request.sampling)
                    self._running.append(seq)
                self.max_running = max(self.max_running, len(self._running))
                if self._running:
                    return True
                self._cond.wait()

    def _may_admit(self, seq: FastSequence) -> bool:
        """A request on trial prefills with no other newcomer beside it."""
        newcomers = [s for s in self._running if not s.done and s.completion_tokens == 0]
        if any(s.solo for s in newcomers):
            return False
        return not (seq.solo and newcomers)

    def _release(self, seq: FastSequence) -> None:
        with self._cond:
            self._release_locked(seq)

    def _release_locked(self, seq: FastSequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None

    def _step(self) -> None:
        decoding = [s for s in self._running if s.decoding]
        self.decoded_rows = len(decoding)
        if decoding:
            self._decode(decoding)
        try:
            self.vision.run(self._running)
            self._prefill()
        except Exception as exc:  # a newcomer's images or prompt: the decoding rows go on
            log.exception("fast_prefill_failed")
            self._retry_newcomers(f"{type(exc).__name__}: {exc}")

    def _retry_newcomers(self, error: str) -> None:
        """Newcomers restart at the head of the queue, each on trial; one already on trial
        (it failed alone) is the guilty one and fails."""
        retry: list[FastSequence] = []
        for seq in [s for s in self._running if not s.done and s.completion_tokens == 0]:
            self._release(seq)
            if seq.solo:
                seq.finish("error", error)
            else:
                seq.restart_alone()
                retry.append(seq)
        with self._cond:
            self._waiting.extendleft(reversed(retry))

    # -- token handling ----------------------------------------------------------------------
    def _accept(self, seq: FastSequence, token: int) -> None:
        """Record one sampled token; finish the request or keep it for the next decode step."""
        seq.completion_tokens += 1
        self.tokens_out += 1
        seq.output_ids.append(token)
        seq.last_token = None
        if seq.first_token_step is None:
            seq.first_token_step = self.steps
            seq.first_token_at = time.perf_counter()
        reason: FinishReason | None = None
        if seq.grammar is not None and not seq.grammar.accept(token):
            self._release(seq)
            seq.finish("error", f"token {token} is outside the response format's grammar")
            return
        if token in self.eos:
            reason = "stop"
        else:
            delta = seq.detok.add(token)
            if delta:
                seq.emit(TextDelta(delta, seq.take_logprobs()))
            if seq.detok.stopped:
                reason = "stop"
            elif seq.completion_tokens >= seq.request.sampling.max_tokens:
                reason = "length"
        if reason is None:
            seq.last_token = token
            return
        seq.finish_step = self.steps
        seq.finished_at = time.perf_counter()
        # Free the slot before the last event goes out: whoever reads `Finished` sees it free.
        self._release(seq)
        if self.on_finish is not None:  # before the event, so that its reader sees the record
            self.on_finish(seq)
        seq.finish(reason)

    # -- decode ------------------------------------------------------------------------------
    def _decode(self, decoding: list[FastSequence]) -> None:
        by_slot = {s.slot: s for s in decoding if s.slot is not None and s.last_token is not None}
        n = max(by_slot) + 1
        kv_len = max(s.cached for s in decoding) + 1
        vision_len = max(s.vision_tokens for s in decoding)
        if self.graphs is not None:
            n, kv_len, vision_len = self.graphs.bucket(n, kv_len, vision_len)
        rows = {slot: (int(seq.last_token or 0), seq.cached) for slot, seq in by_slot.items()}
        device = self.forward.device
        inputs = make_decode_inputs(self.cache, rows, n=n, kv_len=kv_len, vision_len=vision_len)
        run = self.graphs.run if self.graphs is not None else self.forward.decode
        logits = run(inputs)
        slots = sorted(by_slot)
        index = torch.tensor(slots, dtype=torch.long, device=device)
        # A copy of the graph's output rows: the grammar mask never touches the graph's buffer.
        rows_logits = logits.index_select(0, index)
        seqs = [by_slot[slot] for slot in slots]
        self.constraints.mask(seqs, rows_logits)
        chosen = self.sampler.sample(rows_logits, slots)
        self.constraints.record_logprobs(seqs, chosen, self.sampler.last_scores)
        for seq, token in zip(seqs, chosen, strict=True):
            seq.cached += 1
            self._accept(seq, token)

    # -- prefill -----------------------------------------------------------------------------
    def _prefill(self) -> None:
        budget = self.config.prefill_chunk_tokens
        chunks: list[PrefillChunk] = []
        owners: list[FastSequence] = []
        device = self.forward.device
        width = 0  # the batch is right-padded to its widest chunk
        for seq in self._running:
            if len(chunks) >= self.config.max_prefill_seqs:
                break
            if seq.done or seq.slot is None or not seq.vision_ready:
                continue
            remaining = seq.prompt_tokens - seq.cached
            if remaining <= 0:
                continue
            # Bound the padded area (rows x width), which is what the step computes, by the
            # budget: one more row may be at most budget // rows wide, and never narrows the
            # rows already taken below their width.
            cap = budget // (len(chunks) + 1)
            if cap < width:
                break
            take = min(remaining, cap)
            width = max(width, take)
            start = seq.cached
            vision_mask = None
            if seq.tile_mask is not None and seq.vision_tokens:
                rows = seq.tile_mask[start : start + take]
                vision_mask = rows.repeat_interleave(self.forward.tokens_per_tile, dim=1)
                vision_mask = vision_mask.to(device)
            chunks.append(
                PrefillChunk(
                    slot=seq.slot,
                    tokens=seq.input_ids[start : start + take].to(device),
                    start=start,
                    vision_mask=vision_mask,
                    want_logits=start + take == seq.prompt_tokens,
                )
            )
            owners.append(seq)
        if not chunks:
            return
        logits = self.forward.prefill(chunks)
        finishing: list[FastSequence] = []
        for seq, chunk in zip(owners, chunks, strict=True):
            seq.cached += int(chunk.tokens.shape[0])
            seq.prefill_chunks += 1
            if chunk.want_logits:
                finishing.append(seq)
        if finishing:
            slots = [s.slot for s in finishing if s.slot is not None]
            self.constraints.mask(finishing, logits)
            chosen = self.sampler.sample(logits, slots)
            self.constraints.record_logprobs(finishing, chosen, self.sampler.last_scores)
            for seq, token in zip(finishing, chosen, strict=True):
                self._accept(seq, token)
