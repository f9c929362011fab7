"""Response-format masks and logprobs for the fast engine's sampled rows.

Both work on the rows that sampling takes, outside the CUDA graph: the decode graph writes its
logits into a static buffer, the batcher gathers the sampled rows into a new tensor, and only
that copy is masked (`model.grammar.mask_rows`), so a captured graph is never touched and rows
without a grammar pay nothing. Logprobs come from the sampler's scores of the same step (after
penalties and the mask, before temperature), as in the batch engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from model.fast.sequence import FastSequence
from model.grammar import mask_rows
from model.logprobs import TokenBytes, token_logprob


class SlotConstraints:
    def __init__(
        self, vocab_size: int, eos_token_ids: Iterable[int], token_bytes: TokenBytes | None
    ) -> None:
        self.vocab_size = vocab_size
        self.token_bytes = token_bytes
        self._eos = frozenset(eos_token_ids)  # never sent as text: no logprob entry either

    def mask(self, seqs: Sequence[FastSequence], logits: torch.Tensor) -> None:
        """Mask row i of `logits` with `seqs[i]`'s grammar (in place; rows without one stay)."""
        if any(s.grammar is not None for s in seqs):
            mask_rows([s.grammar for s in seqs], logits, self.vocab_size)

    def record_logprobs(
        self, seqs: Sequence[FastSequence], chosen: Sequence[int], scores: torch.Tensor | None
    ) -> None:
        """Queue each sampled token's logprob entry on the sequences that asked for them."""
        if scores is None or self.token_bytes is None:
            return
        for i, (seq, token) in enumerate(zip(seqs, chosen, strict=True)):
            top = seq.request.sampling.top_logprobs
            if top is None or token in self._eos:
                continue
            # On the device: log-softmax and top-k there, a few numbers come back.
            entry = token_logprob(scores[i].float(), token, top, self.token_bytes)
            seq.pending_logprobs.append(entry)
