"""Llama Guard 3 (1B, 8B, 11B-Vision) as a batched `Guard`: P(unsafe) plus the hazard codes.

Loading (a local directory, never a hub id): the text models with `AutoTokenizer` +
`AutoModelForCausalLM`; the vision model (config `model_type == "mllama"`) with `AutoProcessor`
+ `MllamaForConditionalGeneration`.

The prompt is rendered by the checkpoint's own chat template, which carries the category list
and its quirks. Custom `categories` and `excluded_category_keys` go through the template's
arguments when it takes them (1B, 11B-Vision); for a template with a fixed list (8B) the list
inside the template text is replaced by the same rendering (`key: description` lines), so the
three behave alike. User text is tokenised with `sanitize_control_tokens=True`: a user who
writes `<|eot_id|>` or `<|image|>` gets those characters as plain text, not as control tokens
that could end the conversation early or inject an image slot.

Conversation given to the model (the template wants strictly alternating user/assistant turns):
system text is folded into the first user turn (API users write system messages too), text
parts of a turn are joined with newlines, consecutive turns of one role are merged, a leading
assistant turn gets an empty user turn before it. Input stage (prompt classification): the
conversation up to its last user turn; the template then asks about the last `User` message.
Output stage (response classification): the completion is appended as an assistant turn; the
template asks about the last `Agent` message. Only the vision model sees an image: the most
recent image of a user turn (the model takes one); text models ignore images.

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
import re
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
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from guards.base import CategoryScore, GuardInput, GuardVerdict, Stage, severity_from_score
from guards.llama_guard_parser import LlamaGuardParseError, parse_llama_guard_output
from guards.micro_batcher import BatchingGuard
from model.device import device_and_dtype
from model.engine import ImagePart, TextPart

DEFAULT_THRESHOLD = 0.5
_BLOCK = re.compile(
    r"<BEGIN UNSAFE ?CONTENT CATEGORIES>\n(?P<body>.*?)<END UNSAFE CONTENT CATEGORIES>", re.S
)
_CODE_LINE = re.compile(r"^(S\d+): ", re.M)
_PROBE = "LLAMA-GUARD-PROBE-5f0c"


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


def _jinja_string_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")


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
            self.processor = AutoProcessor.from_pretrained(path)
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

        # Categories: through the template's arguments, or by rewriting its fixed list.
        self.template_takes_categories = "excluded_category_keys" in template
        self.template_kwargs: dict[str, Any] = {}
        if self.template_takes_categories:
            self.template_kwargs["excluded_category_keys"] = list(excluded_category_keys)
            if categories is not None:
                self.template_kwargs["categories"] = dict(categories)
        elif categories is not None or excluded_category_keys:
            template = self._rewrite_fixed_categories(template, categories, excluded_category_keys)
        self.chat_template = template
        self.parts_content = self._probe_content_format()
        self.valid_codes = self._rendered_codes()

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

    @staticmethod
    def _rewrite_fixed_categories(
        template: str, categories: Mapping[str, str] | None, excluded: Sequence[str]
    ) -> str:
        match = _BLOCK.search(template)
        if match is None or len(_BLOCK.findall(template)) != 1:
            raise ValueError("cannot find the category list in this chat template")
        body = match.group("body")
        if categories is None:  # the template's own list (already template text), minus excluded
            lines = [line for line in body.splitlines() if line.strip()]
            kept = [line for line in lines if line.split(":", 1)[0] not in set(excluded)]
        else:  # new text inside the template's string literal: escape it
            kept = [
                _jinja_string_escape(f"{k}: {v}")
                for k, v in categories.items()
                if k not in set(excluded)
            ]
        new_body = "".join(line + "\n" for line in kept)
        return template[: match.start("body")] + new_body + template[match.end("body") :]

    def _render(self, conversation: list[dict[str, Any]]) -> str:
        text = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False, **self.template_kwargs
        )
        return str(text)

    def _probe_content_format(self) -> bool:
        """True when the template reads a list of parts, False when it reads strings (8B)."""
        parts = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
        try:
            if _PROBE in self._render(parts):
                return True
        except Exception:  # the 8B template calls .strip() on the content
            pass
        if _PROBE in self._render([{"role": "user", "content": _PROBE}]):
            return False
        raise ValueError("this chat template does not render a conversation's text")

    def _rendered_codes(self) -> tuple[str, ...]:
        prompt = self._render(self._messages([("user", _PROBE)], with_image=False))
        match = _BLOCK.search(prompt)
        codes = tuple(_CODE_LINE.findall(match.group("body"))) if match else ()
        if not codes:
            raise ValueError("the rendered prompt lists no S<n> categories")
        return codes

    # --- conversations -----------------------------------------------------------------------

    def _turns(self, item: GuardInput) -> tuple[list[tuple[str, str]], Image | None]:
        """(role, text) pairs that alternate user/assistant, starting with user; and the image."""
        system: list[str] = []
        turns: list[tuple[str, str]] = []
        image: Image | None = None
        for turn in item.messages:
            text = "\n".join(p.text for p in turn.parts if isinstance(p, TextPart))
            if turn.role == "system":
                system.append(text)
                continue
            # A tool result is content brought into the conversation on the user's side:
            # Llama Guard knows only User and Agent turns.
            turns.append(("user" if turn.role == "tool" else turn.role, text))
            if turn.role == "user":
                images = [p.image for p in turn.parts if isinstance(p, ImagePart)]
                if images:
                    image = images[-1]  # the most recent user image wins
        if item.stage == "input":
            while turns and turns[-1][0] != "user":
                turns.pop()
        else:
            turns.append(("assistant", item.completion or ""))
        merged: list[list[str]] = []
        for role, text in turns:
            if merged and merged[-1][0] == role:
                merged[-1][1] = f"{merged[-1][1]}\n\n{text}"
            else:
                merged.append([role, text])
        if not merged or merged[0][0] != "user":
            merged.insert(0, ["user", ""])
        if system:
            merged[0][1] = "\n\n".join([*system, merged[0][1]]).strip("\n")
        return [(role, text) for role, text in merged], image if self.vision else None

    def _messages(self, turns: list[tuple[str, str]], *, with_image: bool) -> list[dict[str, Any]]:
        if not self.parts_content:
            return [{"role": role, "content": text} for role, text in turns]
        messages: list[dict[str, Any]] = []
        for i, (role, text) in enumerate(turns):
            content: list[dict[str, Any]] = [{"type": "text", "text": text}]
            if with_image and i == 0:  # the template only asks whether an image is present
                content.insert(0, {"type": "image"})
            messages.append({"role": role, "content": content})
        return messages

    def conversation(self, item: GuardInput) -> tuple[list[dict[str, Any]], Image | None]:
        """The template messages for `item`, and the image the vision model will see."""
        turns, image = self._turns(item)
        return self._messages(turns, with_image=image is not None), image

    def render_prompt(self, item: GuardInput) -> str:
        """The prompt text exactly as the template renders it (for logs and tests)."""
        messages, _ = self.conversation(item)
        return self._render(messages)

    def _prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **self.template_kwargs,
        )
        if ids and isinstance(ids[0], list):  # some tokenizers return a batch of one
            ids = ids[0]
        return [int(i) for i in ids]

    # --- synchronous work (runs in the batcher's thread) --------------------------------------

    def classify_batch(self, items: list[GuardInput]) -> list[GuardVerdict]:
        """One verdict per item. Scoring: one forward pass per group of up to `max_batch`."""
        started = time.perf_counter()
        prepared: list[_Prepared] = []
        verdicts: list[GuardVerdict | None] = [None] * len(items)
        budget = self.context_length - 1 - len(self.unsafe_ids) - self.max_new_tokens
        for index, item in enumerate(items):
            try:
                messages, image = self.conversation(item)
                ids = [*self._prompt_ids(messages), self.nn_id]
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
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, length - len(seq) :] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images and images[0] is not None:
            feats = self.processor.image_processor(
                images=[[img] for img in images], return_tensors="pt"
            )
            num_tiles = feats.pop("num_tiles")
            token_masks = [
                get_cross_attention_token_mask(row, self.image_token_id)
                for row in input_ids.tolist()
            ]
            dense = convert_sparse_cross_attention_mask_to_dense(
                token_masks,
                num_tiles=num_tiles,
                max_num_tiles=self.processor.image_processor.max_image_tiles,
                length=length,
            )
            inputs["cross_attention_mask"] = torch.from_numpy(dense)
            inputs["pixel_values"] = feats["pixel_values"].to(self.dtype)
            inputs["aspect_ratio_ids"] = feats["aspect_ratio_ids"]
            inputs["aspect_ratio_mask"] = feats["aspect_ratio_mask"]
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
        config = GenerationConfig(
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
