"""Llama Guard 3 (1B, 8B, 11B-Vision) as a batched `Guard`: P(unsafe) plus the hazard codes.

Loading (a local directory, never a hub id): the text models with `AutoTokenizer` +
`AutoModelForCausalLM`; the vision model (config `model_type == "mllama"`) with `AutoProcessor`
+ `MllamaForConditionalGeneration`.

The prompt (the checkpoint's chat template with the policy's categories) and the conversation
the model is given: `guards.llama_guard_prompt`. The batch as model inputs (left padding, the
vision model's image features): `guards.llama_guard_inputs`. The answer's parser:
`guards.llama_guard_parser`.

Scoring: the template ends at `<|start_header_id|>assistant<|end_header_id|>` without a newline
and the model's first token is `\\n\\n`; that token (looked up with the tokenizer, 271 in the real
vocabulary) is appended and one forward pass over the whole batch (left-padded, explicit
positions) gives, at the last position, P(unsafe) = softmax over {first token of "safe", first
token of "unsafe"} (19193 / 39257 in the real vocabulary).

Categories: when P(unsafe) >= `threshold` (0.5 by default), the items are continued after
`\\n\\nunsafe` by one greedy batched generation (at most `max_new_tokens`), and the answer is
parsed strictly by `parse_llama_guard_output`, with the codes of the rendered category list as
the only valid ones. A generation that does not parse or does not end with an end-of-turn token
fails closed: the item's verdict gets `error` set (the pipeline applies the policy's on-failure
action, block by default), with `p_unsafe` and the raw text kept in `details`. We do not turn it
into "every category detected": that would annotate responses with categories nobody found.

Per-category probabilities: the scoring pass also carries the tokens the model writes after
`unsafe` up to the first code (`unsafe`, `\n`, `S` in the real vocabulary; found by tokenising
`unsafe\n<code>` for every code and taking their common prefix, each code then being one token:
`1` .. `14`). The same forward pass (the extra tokens cannot change the earlier positions: the
model is causal) gives at the last position the next-token distribution over the code tokens,
renormalised over the valid codes: q(code | unsafe), the model's own probability that this is
the category it names first. For an item that is continued (P(unsafe) >= threshold), every step
of the generation that emits a code contributes its distribution too (q is the maximum over those
positions, so a second listed code is not scored by the first position alone). Each code's score
is P(unsafe) * q(code): a real probability in [0, 1], near 0 for every code when the text is
safe. A vocabulary where the codes are not single tokens after a common prefix falls back to
P(unsafe) for the listed codes and 0 for the others (logged once at load).

Verdict categories: one entry per code of the rendered list ("S1".."S14"), each with that score;
`detected` is True for the codes the model listed, and their severity is
`severity_from_score(P(unsafe))`; codes it did not list have severity "safe". Details:
`{"p_unsafe", "codes", "raw", "image", "code_probabilities"}` (q per code, when available).

Vision batching: bug huggingface/transformers#39379 makes a text-only row answer differently
when it shares a batch with image rows, so items are grouped by kind (with image / without) and
each group gets its own forward pass; image rows batch together (each has exactly one image).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL.Image import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    MllamaForConditionalGeneration,
)

from guards.base import CategoryScore, GuardInput, GuardVerdict, Stage, severity_from_score
from guards.llama_guard_inputs import image_inputs, padded_inputs
from guards.llama_guard_parser import LlamaGuardParseError, parse_llama_guard_output
from guards.llama_guard_prompt import LlamaGuardPrompt
from guards.micro_batcher import BatchingGuard
from model.device import device_and_dtype

DEFAULT_THRESHOLD = 0.5


@dataclass
class _Prepared:
    index: int
    ids: list[int]
    image: Image | None
    p_unsafe: float = 0.0
    # q(code | unsafe) per code (see the module doc); empty when the vocabulary has no code tokens.
    code_q: dict[str, float] = field(default_factory=dict)
    verdict: GuardVerdict | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LlamaGuard(BatchingGuard):
    """Llama Guard 3 text or vision model as a batched `Guard` (see the module docstring)."""

    def __init__(
        self,
        path: str | pathlib.Path,
        *,
        device: str = "auto",
        threshold: float = DEFAULT_THRESHOLD,
        stages: frozenset[Stage] = frozenset({"input", "output"}),
        categories: Mapping[str, str] | None = None,
        excluded_category_keys: Sequence[str] = (),
        name: str = "llama_guard",
        max_new_tokens: int = 20,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        super().__init__(
            name, stages, self.classify_batch, max_batch=max_batch, max_wait_s=max_wait_s
        )
        self.threshold = threshold
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.device, self.dtype = device_and_dtype(device)
        path = pathlib.Path(path)
        config: Any = AutoConfig.from_pretrained(path)
        self.vision = config.model_type == "mllama"
        # The tokenizer and processor are used only in the batcher's one worker thread after
        # start (a fast tokenizer's state is not thread-safe, issue 13).
        self.processor: Any = None
        model: Any
        if self.vision:
            self.processor = AutoProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]
            self.tokenizer: Any = self.processor.tokenizer
            template = self.processor.chat_template or self.tokenizer.chat_template
            model = MllamaForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
            self.image_token_id = int(self.processor.image_token_id)
            text_config = config.text_config
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            template = self.tokenizer.chat_template
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
            text_config = config
        if not isinstance(template, str) or not template:
            raise ValueError(f"{path} has no chat template (a Llama Guard checkpoint has one)")
        self.model = model.to(self.device).eval()
        self.context_length = int(getattr(text_config, "max_position_embeddings", 131072))

        self.prompt = LlamaGuardPrompt(
            self.tokenizer,
            template,
            vision=self.vision,
            categories=categories,
            excluded_category_keys=excluded_category_keys,
        )
        self.valid_codes = self.prompt.valid_codes

        # Token ids of the verdict, looked up (never hard-coded).
        self.nn_id = self._single_token("\n\n")
        self.safe_id = self._encode("safe")[0]
        self.unsafe_ids = self._encode("unsafe")
        if self.safe_id == self.unsafe_ids[0]:
            raise ValueError("'safe' and 'unsafe' start with the same token")
        eot = int(self.tokenizer.convert_tokens_to_ids("<|eot_id|>"))
        eos = model.generation_config.eos_token_id
        eos_list = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self.eos_ids = sorted({eot, *(int(e) for e in eos_list)})
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else eot
        self.code_prefix, self.code_tokens = self._code_tokens()

    # --- set-up helpers ----------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def _single_token(self, text: str) -> int:
        ids = self._encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not one token in this tokenizer: {ids}")
        return ids[0]

    def _code_tokens(self) -> tuple[list[int], dict[str, int]]:
        """The tokens written after `unsafe` before the first code, and each code's own token;
        ([], {}) when the vocabulary does not spell the codes that way (see the module doc)."""
        spelled = {code: self._encode("unsafe\n" + code) for code in self.valid_codes}
        rows = list(spelled.values())
        common = 0
        while all(len(r) > common and r[common] == rows[0][common] for r in rows):
            common += 1
        prefix = rows[0][:common]
        tokens = {code: ids[common] for code, ids in spelled.items() if len(ids) == common + 1}
        n = len(self.unsafe_ids)
        if (
            prefix[:n] != self.unsafe_ids
            or len(tokens) != len(spelled)
            or len(set(tokens.values())) != len(tokens)
        ):
            return [], {}
        return prefix[n:], tokens

    # --- the prompt (`guards.llama_guard_prompt`) ------------------------------------------

    @property
    def judged_categories(self) -> frozenset[str]:
        return frozenset(self.valid_codes)

    def conversation(self, item: GuardInput) -> tuple[list[dict[str, Any]], Image | None]:
        """The template messages for `item`, and the image the vision model will see."""
        return self.prompt.conversation(item)

    def render_prompt(self, item: GuardInput) -> str:
        """The prompt text exactly as the template renders it (for logs and tests)."""
        return self.prompt.render_prompt(item)

    # --- synchronous work (runs in the batcher's thread) --------------------------------------

    def classify_batch(self, items: list[GuardInput]) -> list[GuardVerdict]:
        """One verdict per item. Scoring: one forward pass per group of up to `max_batch`."""
        started = time.perf_counter()
        prepared: list[_Prepared] = []
        verdicts: list[GuardVerdict | None] = [None] * len(items)
        budget = self.context_length - 1 - len(self.unsafe_ids) - self.max_new_tokens
        for index, item in enumerate(items):
            try:
                messages, image = self.prompt.conversation(item)
                ids = [*self.prompt.token_ids(messages), self.nn_id]
            except Exception as exc:  # a conversation the template refuses: this item fails
                verdicts[index] = self._error(f"cannot render the prompt: {exc}")
                continue
            if len(ids) > budget:
                verdicts[index] = self._error(
                    f"prompt of {len(ids)} tokens exceeds the guard's context ({budget})"
                )
                continue
            prepared.append(_Prepared(index, ids, image))
        groups = [[p for p in prepared if p.image is None], [p for p in prepared if p.image]]
        for group in groups:
            for start in range(0, len(group), self.max_batch):
                self._score(group[start : start + self.max_batch])
        for group in groups:
            unsafe = [p for p in group if p.p_unsafe >= self.threshold]
            for start in range(0, len(unsafe), self.max_batch):
                self._categorise(unsafe[start : start + self.max_batch])
        elapsed = time.perf_counter() - started
        for p in prepared:
            verdicts[p.index] = p.verdict or self._verdict(
                p.p_unsafe, (), "", p.image is not None, p.code_q
            )
        out = [v if v is not None else self._error("internal: no verdict") for v in verdicts]
        for v in out:
            v.latency_s = elapsed
        return out

    def _inputs(self, seqs: list[list[int]], images: list[Image | None]) -> dict[str, Any]:
        """Left-padded tensors (with the image features for a group of image items)."""
        inputs = padded_inputs(seqs, self.pad_id)
        if images and images[0] is not None:
            rows = [img for img in images if img is not None]
            inputs |= image_inputs(
                inputs["input_ids"],
                rows,
                processor=self.processor,
                image_token_id=self.image_token_id,
                dtype=self.dtype,
            )
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def _score(self, group: list[_Prepared]) -> None:
        if not group:
            return
        # `unsafe` + the code prefix ride along: the last position then gives q(code | unsafe).
        tail = [*self.unsafe_ids, *self.code_prefix] if self.code_tokens else []
        inputs = self._inputs([[*p.ids, *tail] for p in group], [p.image for p in group])
        mask = inputs["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            **inputs, position_ids=position_ids, use_cache=False, logits_to_keep=len(tail) + 1
        )
        pair = out.logits[:, 0, [self.safe_id, self.unsafe_ids[0]]].float()
        p_unsafe = torch.softmax(pair, dim=-1)[:, 1].tolist()
        code_q = self._code_distribution(out.logits[:, -1]) if tail else [{} for _ in group]
        for p, value, q in zip(group, p_unsafe, code_q, strict=True):
            p.p_unsafe = float(value)
            p.code_q = q

    def _code_distribution(self, logits: torch.Tensor) -> list[dict[str, float]]:
        """Rows of next-token logits -> per row, the distribution over the valid codes."""
        codes = list(self.code_tokens)
        ids = [self.code_tokens[c] for c in codes]
        q = torch.softmax(logits[:, ids].float(), dim=-1).tolist()
        return [dict(zip(codes, row, strict=True)) for row in q]

    @torch.inference_mode()
    def _categorise(self, group: list[_Prepared]) -> None:
        if not group:
            return
        seqs = [[*p.ids, *self.unsafe_ids] for p in group]
        inputs = self._inputs(seqs, [p.image for p in group])
        length = inputs["input_ids"].shape[1]
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        out = self.model.generate(
            **inputs,
            generation_config=config,
            return_dict_in_generate=True,
            output_logits=bool(self.code_tokens),
        )
        generated = out.sequences[:, length:].tolist()
        code_ids = set(self.code_tokens.values())
        for row_index, (p, row) in enumerate(zip(group, generated, strict=True)):
            # Each step that emits a code adds its own distribution (max per code).
            for step, tok in enumerate(row):
                if tok in code_ids and out.logits is not None and step < len(out.logits):
                    (q,) = self._code_distribution(out.logits[step][row_index : row_index + 1])
                    p.code_q = {c: max(v, p.code_q.get(c, 0.0)) for c, v in q.items()}
        for p, row in zip(group, generated, strict=True):
            end = next((i for i, tok in enumerate(row) if tok in self.eos_ids), None)
            tokens = row if end is None else row[: end + 1]
            raw = "unsafe" + self.tokenizer.decode(tokens, skip_special_tokens=False)
            details = {"p_unsafe": p.p_unsafe, "raw": raw, "image": p.image is not None}
            if end is None:
                p.verdict = self._error(
                    f"category list not finished within {self.max_new_tokens} tokens", details
                )
                continue
            try:
                result = parse_llama_guard_output(raw, valid_codes=self.valid_codes)
            except LlamaGuardParseError as exc:
                p.verdict = self._error(f"unparseable Llama Guard output: {exc}", details)
                continue
            p.verdict = self._verdict(p.p_unsafe, result.codes, raw, p.image is not None, p.code_q)

    # --- verdicts ----------------------------------------------------------------------------

    def _error(self, message: str, details: dict[str, Any] | None = None) -> GuardVerdict:
        return GuardVerdict(self.name, error=message, details=dict(details or {}))

    def _categories(
        self, p_unsafe: float, codes: Sequence[str], code_q: Mapping[str, float]
    ) -> dict[str, CategoryScore]:
        severity = severity_from_score(p_unsafe)
        out = {}
        for code in self.valid_codes:
            if code_q:
                score = p_unsafe * code_q.get(code, 0.0)
            else:  # no code tokens in this vocabulary: the listed codes carry P(unsafe)
                score = p_unsafe if code in codes else 0.0
            listed = code in codes
            out[code] = CategoryScore(score, severity if listed else "safe", detected=listed)
        return out

    def _verdict(
        self,
        p_unsafe: float,
        codes: Sequence[str],
        raw: str,
        image: bool,
        code_q: Mapping[str, float] | None = None,
    ) -> GuardVerdict:
        """The verdict of a scored item: `codes` empty when it was found safe."""
        q = dict(code_q or {})
        details = {
            "p_unsafe": p_unsafe,
            "codes": list(codes),
            "raw": raw,
            "image": image,
            "code_probabilities": q,
        }
        return GuardVerdict(self.name, self._categories(p_unsafe, codes, q), details=details)
