"""Per-request token sampling.

Every request in a batch keeps its own parameters and its own seeded generator, so a seeded
request draws the same random numbers whatever else shares its batch.
"""

from __future__ import annotations

import secrets

import torch

from model.engine import SamplingParams


class TokenSampler:
    """Chooses the next token for one sequence from its logits row."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self._counts = torch.zeros(vocab_size, dtype=torch.float32)
        self._generator = torch.Generator(device="cpu")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

    @property
    def uses_penalties(self) -> bool:
        return self.params.presence_penalty != 0.0 or self.params.frequency_penalty != 0.0

    def observe(self, token_id: int) -> None:
        """Record a generated token (for presence/frequency penalties)."""
        if 0 <= token_id < self._counts.numel():
            self._counts[token_id] += 1.0

    def sample(self, logits: torch.Tensor) -> int:
        """`logits`: a 1-D float tensor over the vocabulary (any device)."""
        return self.choose(self.scores(logits))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The row that sampling draws from (and logprobs are computed on): float32 on the CPU,
        penalties applied, before temperature and top_p."""
        row = logits.detach().to("cpu", torch.float32)
        row = row[: self._counts.numel()]
        if self.uses_penalties:
            # OpenAI's definition: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence.
            row = row - self._counts * self.params.frequency_penalty
            row = row - (self._counts > 0).float() * self.params.presence_penalty
        return row

    def choose(self, row: torch.Tensor) -> int:
        """Draw the next token from `scores(...)`'s row."""
        if self.params.greedy:
            return int(torch.argmax(row).item())
        probs = torch.softmax(row / self.params.temperature, dim=-1)
        top_p = self.params.top_p
        if 0.0 < top_p < 1.0:
            sorted_probs, sorted_idx = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            drop = (cumulative - sorted_probs) >= top_p
            # A top_p below float32's smallest value (5e-324) rounds to 0 in the comparison.
            drop[0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=self._generator)
            return int(sorted_idx[choice].item())
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
