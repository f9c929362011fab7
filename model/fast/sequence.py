"""One request inside the fast engine: its prepared inputs, progress and milestones."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.detokenizer import IncrementalDetokenizer, finish_stream
from model.engine import (
    EngineEvent,
    EngineRequest,
    Fault,
    FinishReason,
    TokenLogprob,
)
from model.grammar import RowGrammar


@dataclass
class PreparedImages:
    """The processor's image tensors for one request (CPU), and a hash per image."""

    pixel_values: torch.Tensor  # [1, images, max_tiles, 3, H, W]
    aspect_ratio_ids: torch.Tensor  # [1, images]
    aspect_ratio_mask: torch.Tensor  # [1, images, max_tiles]
    keys: list[bytes]

    @property
    def tiles(self) -> list[int]:
        return [int(n) for n in self.aspect_ratio_mask[0].sum(dim=-1).tolist()]


@dataclass(eq=False)
class FastSequence:
    """One request's life in the batcher."""

    request: EngineRequest
    emit: Callable[[EngineEvent], None]
    detok: IncrementalDetokenizer
    input_ids: torch.Tensor  # [T] long, CPU
    # [T, real tiles of all images] bool: which tiles each prompt token sees (None: no image).
    tile_mask: torch.Tensor | None = None
    images: PreparedImages | None = None
    completion_tokens: int = 0
    slot: int | None = None
    cached: int = 0  # tokens whose K/V are in the slot
    vision_ready: bool = False
    vision_tokens: int = 0
    last_token: int | None = None  # sampled, to be fed at the next decode step
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    finish_reason: FinishReason | None = None
    # On trial: a step that prefilled it with other newcomers failed, so it runs again with no
    # other newcomer (if it fails then, it was the guilty one).
    solo: bool = False
    grammar: RowGrammar | None = None  # the response format's, if any
    # Logprobs of tokens whose text the detokenizer has not released yet.
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Observability (tests, benchmarks): steps and times of the milestones.
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    admitted_step: int | None = None
    first_token_step: int | None = None
    finish_step: int | None = None
    prefill_chunks: int = 0

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def restart_alone(self) -> None:
        """Back to a fresh, waiting request (its slot already released), now on trial."""
        self.slot, self.cached, self.vision_ready, self.vision_tokens = None, 0, False, 0
        self.last_token, self.prefill_chunks, self.admitted_step = None, 0, None
        self.solo = True

    @property
    def decoding(self) -> bool:
        return self.last_token is not None and not self.done

    def finish(
        self, reason: FinishReason, error: str | None = None, fault: Fault = "server"
    ) -> None:
        finish_stream(self, reason, error, fault, logprobs=self.take_logprobs())

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        taken = tuple(self.pending_logprobs)
        self.pending_logprobs.clear()
        return taken
