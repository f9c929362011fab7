"""Grammar-constrained decoding: a JSON schema becomes a per-row token mask (xgrammar).

Per engine, one `GrammarBook` holds the tokenizer's vocabulary as xgrammar sees it and a
compiler whose cache keeps each schema's compiled grammar (keyed by the canonical schema text:
the first request with a schema pays the compile, the next ones reuse it). Per request, a
`RowGrammar` tracks where the output is in the grammar. Per decode step, `mask_rows` fills one
bitmask row per constrained request and sets every token the grammar forbids to -inf in that
row of the logits; free rows of the same batch are left alone.

JSON is compact (no whitespace between tokens, `,` and `:` separators): a weak model otherwise
pads with whitespace until `max_tokens`.

Two holes of xgrammar 0.2.9's JSON strings, both seen here with random logits, are closed by
masks of our own: a raw control byte (U+0000-U+001F, which JSON forbids unescaped: `"D\\x01"`)
and a UTF-16 surrogate encoded as UTF-8 (`ED A0..BF ..`, invalid UTF-8: it decoded to U+FFFD).
Tokens holding either are masked; a surrogate split across tokens is caught by masking, after a
token that ends in byte ED, every token that starts with A0..BF.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

# Bytes that JSON never allows raw, in a string or between tokens (compact output).
_CONTROL_BYTES = frozenset(range(0x20))
_SURROGATE_LEAD = 0xED
_SURROGATE_SECOND = range(0xA0, 0xC0)


@dataclass(frozen=True)
class ByteMasks:
    """Masks over the vocabulary that keep JSON strings valid UTF-8 without control bytes."""

    allowed: torch.Tensor  # packed bitmask row: no control byte, no whole surrogate
    after_lead: torch.Tensor  # packed bitmask row: no token starting with A0..BF
    ends_with_lead: frozenset[int]  # tokens whose last byte is ED

    @classmethod
    def build(cls, decoded_vocab: Sequence[bytes], vocab: int) -> ByteMasks:
        allowed = [True] * vocab
        after_lead = [True] * vocab
        ends: set[int] = set()
        for i, raw in enumerate(decoded_vocab[:vocab]):
            if _CONTROL_BYTES.intersection(raw) or _has_surrogate(raw):
                allowed[i] = False
            if raw and raw[0] in _SURROGATE_SECOND:
                after_lead[i] = False
            if raw and raw[-1] == _SURROGATE_LEAD:
                ends.add(i)
        return cls(_pack(allowed), _pack(after_lead), frozenset(ends))


def _has_surrogate(raw: bytes) -> bool:
    return any(
        raw[i] == _SURROGATE_LEAD and raw[i + 1] in _SURROGATE_SECOND for i in range(len(raw) - 1)
    )


class GrammarBook:
    """Compiles schemas for one tokenizer and vocabulary size (the LM head's rows)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop = sorted(stop_token_ids)
        self._lock = threading.Lock()
        self._info: xgr.TokenizerInfo | None = None
        self._compiler: xgr.GrammarCompiler | None = None
        self._masks: ByteMasks | None = None

    def _ready(self) -> tuple[xgr.GrammarCompiler, ByteMasks]:
        # Built on first use (a real vocabulary takes ~1 s): engines that never see a
        # constrained request never pay it.
        with self._lock:
            if self._compiler is None or self._masks is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop
                )
                self._info = info
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
                self._masks = ByteMasks.build(info.decoded_vocab, self.vocab_size)
            return self._compiler, self._masks

    @property
    def decoded_vocab(self) -> list[bytes]:
        self._ready()
        assert self._info is not None
        return list(self._info.decoded_vocab)

    def compile(self, schema: str) -> xgr.CompiledGrammar:
        """The compiled grammar of a canonical schema text (cached by xgrammar's compiler)."""
        compiler, _ = self._ready()
        return compiler.compile_json_schema(
            schema, any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    def row(self, schema: str) -> RowGrammar:
        """A fresh matcher for one request (thread-safe; compile on a worker thread)."""
        _, masks = self._ready()
        return RowGrammar(xgr.GrammarMatcher(self.compile(schema)), masks)


class RowGrammar:
    """One request's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher, masks: ByteMasks) -> None:
        self._matcher = matcher
        self._masks = masks
        self._after_lead = False

    @property
    def masks(self) -> ByteMasks:
        return self._masks

    @property
    def after_lead(self) -> bool:
        """The last token ended in byte ED: the next must not continue a surrogate."""
        return self._after_lead

    def fill_grammar(self, bitmask: torch.Tensor, row: int) -> None:
        """The grammar's own mask into `bitmask[row]` (without our byte masks)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar forbids it (a bug upstream)."""
        self._after_lead = token_id in self._masks.ends_with_lead
        return bool(self._matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


def mask_rows(grammars: Sequence[RowGrammar | None], logits: torch.Tensor, vocab: int) -> None:
    """Set forbidden tokens to -inf in the rows of `logits` [B, >= vocab] that have a grammar.

    In place; the caller runs it under `torch.inference_mode()` when `logits` came from one.
    """
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
    fill_rows(grammars, bitmask)
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab, indices=rows
    )


def fill_rows(grammars: Sequence[RowGrammar | None], bitmask: torch.Tensor) -> None:
    """Each grammar's next-token mask into its row of `bitmask`, our byte masks ANDed in.

    The byte masks go in with one tensor op for the whole batch (per row they cost more than
    xgrammar's own fill): rows without a grammar are ANDed too, harmlessly, since only the
    constrained rows are applied to the logits."""
    lead: list[int] = []
    masks: ByteMasks | None = None
    for i, grammar in enumerate(grammars):
        if grammar is None:
            continue
        grammar.fill_grammar(bitmask, i)
        masks = grammar.masks
        if grammar.after_lead:
            lead.append(i)
    if masks is None:
        return
    bitmask &= masks.allowed
    if lead:
        index = torch.tensor(lead, dtype=torch.long)
        bitmask[index] = bitmask[index] & masks.after_lead


def _pack(allowed: list[bool]) -> torch.Tensor:
    """A packed bitmask row (32 tokens per int32 word, lowest bit first: xgrammar's layout)."""
    flags = torch.zeros(((len(allowed) + 31) // 32) * 32, dtype=torch.int64)
    flags[: len(allowed)] = torch.tensor(allowed, dtype=torch.int64)
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    words = (flags.view(-1, 32) * weights).sum(dim=-1)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)
