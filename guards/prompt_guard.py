"""Prompt Guard: Meta's jailbreak / prompt-injection classifiers (mDeBERTa sequence classifiers).

Loads a local directory of Prompt Guard 86M (v1, labels `BENIGN`/`INJECTION`/`JAILBREAK`) or
Llama Prompt Guard 2 (86M or 22M, labels `benign`/`malicious`, some exports `LABEL_0`/`LABEL_1`)
with `AutoTokenizer` + `AutoModelForSequenceClassification`; the label layout is read from
`config.id2label`, never assumed from the file name.

Scores (probabilities from a softmax over the model's labels):
- `jailbreak` = P(JAILBREAK) for v1, P(malicious) for v2. Meta's guidance for v1 is that the
  JAILBREAK label applies to what users type, which is what this guard sees at the input stage.
- v1's INJECTION label is meant for third-party content (documents, tool results, web pages):
  on text that users write themselves it fires on any instruction-like sentence. So it is not
  reported as a category by default: its score is kept in `details["injection"]`, together with
  Meta's indirect-injection score P(INJECTION) + P(JAILBREAK) in
  `details["indirect_injection"]`. With `report_indirect_attack=True` (for deployments that pass
  untrusted third-party text through this guard) that indirect-injection score becomes the
  `indirect_attack` category; for v2 it is then P(malicious), which covers both attacks.

Each category is `CategoryScore(score, severity_from_score(score), detected=score >= threshold)`,
threshold 0.9 by default (Meta's). Texts longer than one window are split into 512-token
windows (special tokens included) that overlap by `window_overlap` tokens, and the maximum over
windows is taken, so an attack at the end of a long text is still seen. All windows of a batch
go through the model in one forward pass (in chunks of `max_windows_per_forward` for memory).

What is checked: at the input stage the user and system text of the conversation (what
`GuardInput.text_to_check()` returns); at the output stage, if enabled, the completion.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from guards.base import CategoryScore, GuardInput, GuardVerdict, Stage, severity_from_score
from guards.micro_batcher import BatchingGuard
from model.device import device_and_dtype

DEFAULT_THRESHOLD = 0.9  # Meta's recommended threshold for both versions


@dataclass(frozen=True)
class LabelLayout:
    """Where each meaning sits in the model's output (indices into the logits)."""

    version: int  # 1: BENIGN/INJECTION/JAILBREAK; 2: benign/malicious
    benign: int
    jailbreak: int  # JAILBREAK (v1) or malicious (v2)
    injection: int | None  # v1 only


def label_layout(id2label: dict[Any, str]) -> LabelLayout:
    """Read the label layout from `config.id2label` (PG1, PG2 and PG2's generic LABEL_n)."""
    labels = {int(k): str(v).strip().lower() for k, v in id2label.items()}
    by_name = {v: k for k, v in labels.items()}
    if set(by_name) == {"benign", "injection", "jailbreak"}:
        return LabelLayout(1, by_name["benign"], by_name["jailbreak"], by_name["injection"])
    if set(by_name) == {"benign", "malicious"}:
        return LabelLayout(2, by_name["benign"], by_name["malicious"], None)
    if set(by_name) == {"label_0", "label_1"}:  # Llama Prompt Guard 2 exports: 1 = malicious
        return LabelLayout(2, by_name["label_0"], by_name["label_1"], None)
    raise ValueError(f"not a Prompt Guard label layout: {dict(sorted(labels.items()))}")


@dataclass(frozen=True)
class TextScores:
    """Per-text probabilities, maximised over windows (`window_jailbreak` keeps each window's)."""

    jailbreak: float
    injection: float | None
    indirect_injection: float
    windows: int
    window_jailbreak: tuple[float, ...]


class PromptGuard(BatchingGuard):
    """The Prompt Guard classifier as a batched `Guard`."""

    def __init__(
        self,
        path: str | pathlib.Path,
        *,
        device: str = "auto",
        threshold: float = DEFAULT_THRESHOLD,
        stages: frozenset[Stage] = frozenset({"input"}),
        report_indirect_attack: bool = False,
        name: str = "prompt_guard",
        max_length: int = 512,
        window_overlap: int = 64,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_windows_per_forward: int = 64,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        super().__init__(
            name, stages, self.classify_batch, max_batch=max_batch, max_wait_s=max_wait_s
        )
        self.threshold = threshold
        self.report_indirect_attack = report_indirect_attack
        self.device, self.dtype = device_and_dtype(device)
        path = pathlib.Path(path)
        config = AutoConfig.from_pretrained(path)
        self.layout = label_layout(config.id2label)
        tokenizer_kwargs: dict[str, Any] = {}
        if self.layout.version == 2:  # Meta's PG2 tokenizer needs the Mistral-regex fix (FACTS)
            tokenizer_kwargs["fix_mistral_regex"] = True
        # Owned by the batcher's one worker thread after start: its padded calls change the
        # fast tokenizer's shared padding state, so no other thread may call it (issue 13).
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        model: Any = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.max_length = min(max_length, int(self.tokenizer.model_max_length or max_length))
        specials = self.tokenizer.num_special_tokens_to_add(pair=False)
        if not 0 <= window_overlap < self.max_length - specials:
            raise ValueError("window_overlap must be smaller than a window's content")
        self.window_overlap = window_overlap
        self.max_windows_per_forward = max_windows_per_forward

    @property
    def judged_categories(self) -> frozenset[str]:
        if self.report_indirect_attack:
            return frozenset({"jailbreak", "indirect_attack"})
        return frozenset({"jailbreak"})

    # --- synchronous work (runs in the batcher's thread) ----------------------------------

    def classify_batch(self, items: list[GuardInput]) -> list[GuardVerdict]:
        """One verdict per item; all windows of all items in one forward pass."""
        started = time.perf_counter()
        scores = self.score_texts([item.text_to_check() for item in items])
        elapsed = time.perf_counter() - started
        return [self._verdict(s, elapsed) for s in scores]

    def _category(self, score: float) -> CategoryScore:
        return CategoryScore(score, severity_from_score(score), detected=score >= self.threshold)

    def _verdict(self, s: TextScores, elapsed: float) -> GuardVerdict:
        categories = {"jailbreak": self._category(s.jailbreak)}
        if self.report_indirect_attack:
            categories["indirect_attack"] = self._category(s.indirect_injection)
        details: dict[str, Any] = {
            "model_version": self.layout.version,
            "windows": s.windows,
            "indirect_injection": s.indirect_injection,
        }
        if s.injection is not None:
            details["injection"] = s.injection
        return GuardVerdict(self.name, categories, latency_s=elapsed, details=details)

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[TextScores]:
        """Probabilities per text, each the maximum over its windows."""
        todo = [i for i, t in enumerate(texts) if t.strip()]
        results: list[TextScores | None] = [None] * len(texts)
        for i, text in enumerate(texts):
            if not text.strip():  # nothing to attack with: no window, score 0
                results[i] = TextScores(
                    0.0, 0.0 if self.layout.injection is not None else None, 0.0, 0, ()
                )
        if todo:
            enc = self.tokenizer(
                [texts[i] for i in todo],
                truncation=True,
                max_length=self.max_length,
                stride=self.window_overlap,
                return_overflowing_tokens=True,
                padding=True,
                return_tensors="pt",
            )
            owners = enc.pop("overflow_to_sample_mapping").tolist()
            inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            probs = self._window_probs(inputs)
            for local, i in enumerate(todo):
                rows = [r for r, owner in enumerate(owners) if owner == local]
                p = probs[rows]
                jb = p[:, self.layout.jailbreak]
                if self.layout.injection is not None:
                    inj = p[:, self.layout.injection]
                    injection: float | None = float(inj.max())
                    indirect = float((inj + jb).max())
                else:
                    injection = None
                    indirect = float(jb.max())
                results[i] = TextScores(
                    jailbreak=float(jb.max()),
                    injection=injection,
                    indirect_injection=min(indirect, 1.0),
                    windows=len(rows),
                    window_jailbreak=tuple(float(x) for x in jb),
                )
        return [r for r in results if r is not None]

    def _window_probs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Softmax over the labels for every window, in chunks of `max_windows_per_forward`."""
        n = inputs["input_ids"].shape[0]
        out = []
        for start in range(0, n, self.max_windows_per_forward):
            chunk = {
                k: v[start : start + self.max_windows_per_forward].to(self.device)
                for k, v in inputs.items()
            }
            logits = self.model(**chunk).logits.float()
            out.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(out)
