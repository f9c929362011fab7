"""A strict parser for Llama Guard 3's generated verdict.

The model answers exactly one of::

    safe
    unsafe
    S1,S10

(after the `\\n\\n` that follows the assistant header, and before `<|eot_id|>`). Anything else
is a parse failure, which the caller treats as a guard failure (fail closed), never as "safe".

Decisions, all strict on purpose:
- Surrounding whitespace is ignored, and so is one trailing `<|eot_id|>` (the real model ends
  every answer with it; decoding with special tokens keeps it). Nothing else may follow.
- The first line is exactly `safe` or `unsafe`, lowercase. `safe` has no second line.
- `unsafe` needs exactly one more line: a comma-separated list of codes. Spaces around a
  code (`S2, S7`) are tolerated; the list is split on commas (NeMo Guardrails splits on spaces,
  which would read `S1,S10` as one unknown code). Blank lines between the two are refused.
- A code is `S` followed by a number without leading zeros, uppercase `S`, and must be one of
  `valid_codes` (default `S1`..`S14`: Llama Guard 3 8B's list; pass the categories actually
  shown in the prompt to refuse codes the model was not offered). `S0`, `S15`, `s1`, `S01`,
  an empty element (`S1,,S2`, `S1,`), a duplicate code and an empty list are all refused.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

ALL_CODES: tuple[str, ...] = tuple(f"S{i}" for i in range(1, 15))
EOT = "<|eot_id|>"
_CODE = re.compile(r"S[1-9][0-9]*")


class LlamaGuardParseError(ValueError):
    """The model's output is not a well-formed Llama Guard verdict."""


@dataclass(frozen=True)
class LlamaGuardResult:
    safe: bool
    codes: tuple[str, ...] = ()


def parse_llama_guard_output(
    text: str, *, valid_codes: Collection[str] = ALL_CODES
) -> LlamaGuardResult:
    """Parse `safe` or `unsafe\\nS<n>(,S<n>)*`; raise `LlamaGuardParseError` on anything else."""
    body = text.strip()
    if body.endswith(EOT):
        body = body[: -len(EOT)].rstrip()
    if not body:
        raise LlamaGuardParseError("empty output")
    lines = body.split("\n")
    head = lines[0].rstrip()
    if head == "safe":
        if len(lines) != 1:
            raise LlamaGuardParseError(f"text after 'safe': {body!r}")
        return LlamaGuardResult(safe=True)
    if head != "unsafe":
        raise LlamaGuardParseError(f"first line is not 'safe' or 'unsafe': {head[:80]!r}")
    if len(lines) != 2:
        raise LlamaGuardParseError(f"'unsafe' needs exactly one line of categories: {body!r}")
    codes = tuple(part.strip() for part in lines[1].split(","))
    for code in codes:
        if not _CODE.fullmatch(code):
            raise LlamaGuardParseError(f"not a category code: {code!r} in {lines[1]!r}")
        if code not in valid_codes:
            raise LlamaGuardParseError(f"unknown category code {code!r}")
    if len(set(codes)) != len(codes):
        raise LlamaGuardParseError(f"duplicate category code in {lines[1]!r}")
    return LlamaGuardResult(safe=False, codes=codes)
