"""Token log probabilities as OpenAI returns them (`token`, `logprob`, `bytes`, `top_logprobs`).

They are computed from the scores that sampling used: the model's logits after the presence and
frequency penalties and after the grammar mask of a constrained request, before temperature and
top_p (OpenAI documents logprobs independent of temperature; a token the grammar forbids has
probability 0, so it never appears among the alternatives). A token's `bytes` are its exact UTF-8
bytes (a token may hold part of a character); `token` is those bytes decoded with U+FFFD for an
incomplete character.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.engine import TokenLogprob, TopLogprob

MAX_TOP_LOGPROBS = 20
# JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
FLOOR = -9999.0


class TokenBytes:
    """Each token id's bytes, built once per engine on first use."""

    def __init__(self, tokenizer: Any, decoded_vocab: Callable[[], Sequence[bytes]]) -> None:
        self._tokenizer = tokenizer
        self._decoded_vocab = decoded_vocab
        self._table: list[bytes] | None = None
        self._lock = threading.Lock()

    def _get(self) -> list[bytes]:
        with self._lock:
            if self._table is None:
                table = list(self._decoded_vocab())
                specials = set(self._tokenizer.all_special_ids) | set(
                    self._tokenizer.added_tokens_decoder
                )
                for tid in specials:
                    if 0 <= tid < len(table) and not table[tid]:
                        table[tid] = str(self._tokenizer.convert_ids_to_tokens(tid)).encode()
                self._table = table
            return self._table

    def __getitem__(self, token_id: int) -> bytes:
        table = self._get()
        return table[token_id] if 0 <= token_id < len(table) else b""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def token_logprob(scores: torch.Tensor, token: int, top: int, vocab: TokenBytes) -> TokenLogprob:
    """`scores`: one row of processed logits (1-D, float32, CPU)."""
    logp = torch.log_softmax(scores, dim=-1)
    chosen = vocab[token]
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, min(top, MAX_TOP_LOGPROBS, logp.numel()))
        alternatives = tuple(
            TopLogprob(_text(b), float(v), tuple(b))
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            if math.isfinite(v)
            for b in (vocab[int(i)],)
        )
    return TokenLogprob(_text(chosen), _finite(float(logp[token])), tuple(chosen), alternatives)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def openai_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A choice's (or a chunk's) `logprobs` object."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }
