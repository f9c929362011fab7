"""Vectorised sampling on the device, one row per slot, with `model.sampling.TokenSampler`'s rules.

Same transformations as `TokenSampler`: OpenAI's penalties (`mu[j] - c[j] * frequency -
(c[j] > 0) * presence`), greedy when `temperature <= 0`, else softmax at the temperature and
nucleus filtering (keep the smallest set whose mass reaches `top_p`, the first token always
stays) when `0 < top_p < 1`. The whole batch is done in a handful of kernels and one small
device-to-host copy of the chosen ids.

Reproducibility: each request owns a CPU `torch.Generator` (seeded as `TokenSampler` seeds it)
and draws exactly one uniform number per sampled token, whatever else is in the batch; the token
is then picked by inverse CDF over its own filtered distribution. So a seeded request gives the
same text alone or batched (up to the batch-dependent rounding of its logits). The draws differ
from `TokenSampler`'s `multinomial`, so the same seed gives different text than the old engine.
"""

from __future__ import annotations

import secrets

import torch

from model.engine import SamplingParams


class SlotSampler:
    """Sampling state of every slot: parameters on the host, token counts on the device."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(slots, vocab_size, dtype=torch.float32, device=device)
        self._params: list[SamplingParams | None] = [None] * slots
        self._generators: list[torch.Generator | None] = [None] * slots
        # The scores the last `sample` drew from (penalties applied, before temperature):
        # what logprobs are computed on.
        self.last_scores: torch.Tensor | None = None

    def reset(self, slot: int, params: SamplingParams) -> None:
        """A new request takes `slot`."""
        self.counts[slot].zero_()
        self._params[slot] = params
        generator = torch.Generator(device="cpu")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        self._generators[slot] = generator

    def _param(self, slot: int) -> SamplingParams:
        params = self._params[slot]
        if params is None:
            raise RuntimeError(f"slot {slot} has no sampling parameters")
        return params

    def sample(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        """Next token for each row of `logits` `[k, >= vocab]`, row i belonging to `slots[i]`."""
        if not slots:
            return []
        params = [self._param(s) for s in slots]
        device = logits.device
        scores = logits[:, : self.vocab_size].float()
        index = torch.tensor(slots, dtype=torch.long, device=device)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self.counts.index_select(0, index)
            freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
            pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
            scores = scores - counts * freq
            scores = scores - (counts > 0).float() * pres
        self.last_scores = scores
        chosen = torch.argmax(scores, dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, dtype=torch.long, device=device)
            picked = self._sample_rows(
                scores.index_select(0, rows),
                [params[i] for i in sampled],
                [slots[i] for i in sampled],
            )
            chosen = chosen.index_copy(0, rows, picked)
        self.counts.index_put_(
            (index, chosen), torch.ones_like(chosen, dtype=torch.float32), accumulate=True
        )
        return [int(t) for t in chosen.tolist()]

    def _sample_rows(
        self, scores: torch.Tensor, params: list[SamplingParams], slots: list[int]
    ) -> torch.Tensor:
        device = scores.device
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        # top_p outside (0, 1) means no filtering: a threshold above any cumulative mass.
        top_p = torch.tensor(
            [p.top_p if 0.0 < p.top_p < 1.0 else 2.0 for p in params], device=device
        )[:, None]
        draws = []
        for slot in slots:
            generator = self._generators[slot]
            if generator is None:
                raise RuntimeError(f"slot {slot} has no generator")
            draws.append(float(torch.rand((), generator=generator)))
        uniform = torch.tensor(draws, dtype=torch.float32, device=device)[:, None]
        probs = torch.softmax(scores / temperature, dim=-1)
        # stable: ties keep vocabulary order, so the order never depends on the batch.
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = (cumulative - sorted_probs) >= top_p
        drop[:, 0] = False  # the first token always stays (a top_p of 5e-324 is 0 in float32)
        kept = sorted_probs.masked_fill(drop, 0.0)
        cdf = torch.cumsum(kept, dim=-1)
        target = uniform * cdf[:, -1:]
        position = torch.searchsorted(cdf, target, right=True)  # first index with cdf > target
        last_kept = (~drop).sum(dim=-1, keepdim=True) - 1
        position = torch.minimum(position, last_kept)  # rounding at the very top of the CDF
        return sorted_idx.gather(-1, position)[:, 0]
