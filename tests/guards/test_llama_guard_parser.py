"""The strict Llama Guard output parser, on real output strings and on garbage."""

from __future__ import annotations

import pytest

from guards.llama_guard_parser import (
    ALL_CODES,
    LlamaGuardParseError,
    LlamaGuardResult,
    parse_llama_guard_output,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("safe", LlamaGuardResult(True)),
        ("\n\nsafe", LlamaGuardResult(True)),
        ("\n\nsafe<|eot_id|>", LlamaGuardResult(True)),  # decoded with special tokens
        ("\n\nunsafe\nS1", LlamaGuardResult(False, ("S1",))),
        ("\n\nunsafe\nS1<|eot_id|>", LlamaGuardResult(False, ("S1",))),
        ("unsafe\nS1,S10", LlamaGuardResult(False, ("S1", "S10"))),
        ("unsafe\nS10,S1", LlamaGuardResult(False, ("S10", "S1"))),  # order kept
        ("unsafe\nS2, S7", LlamaGuardResult(False, ("S2", "S7"))),  # spaces after commas
        ("unsafe\nS14", LlamaGuardResult(False, ("S14",))),
        ("  unsafe\nS3,S4,S5  \n", LlamaGuardResult(False, ("S3", "S4", "S5"))),
    ],
)
def test_well_formed_outputs(text: str, expected: LlamaGuardResult) -> None:
    assert parse_llama_guard_output(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "<|eot_id|>",
        "unsafe",  # no codes
        "unsafe\n",
        "unsafe<|eot_id|>",
        "unsafe\nS99",
        "unsafe\nS0",
        "unsafe\nS15",
        "unsafe\ns1",  # lowercase
        "unsafe\nS01",  # leading zero
        "unsafe\nS1,,S2",
        "unsafe\nS1,",
        "unsafe\n,S1",
        "unsafe\nS1,S1",  # duplicate
        "unsafe\nS1 S10",  # space-separated (NeMo's reading): not a comma list
        "unsafe S1",  # one line
        "unsafe\n\nS1",  # blank line
        "unsafe\nS1\nS2",  # a third line
        "Unsafe\nS1",
        "SAFE",
        "safe\nS1",  # codes after safe
        "safe<|eot_id|>more",
        "I'm sorry, I can't classify that.",
        "unsafe\nViolent Crimes",
        "unsafe\nO1",  # Llama Guard 1's codes
    ],
)
def test_malformed_outputs_raise(text: str) -> None:
    with pytest.raises(LlamaGuardParseError):
        parse_llama_guard_output(text)


def test_valid_codes_restrict_what_the_model_may_answer() -> None:
    offered = tuple(f"S{i}" for i in range(1, 14))  # Llama Guard 3 1B / 11B-Vision: S1-S13
    assert parse_llama_guard_output("unsafe\nS13", valid_codes=offered).codes == ("S13",)
    with pytest.raises(LlamaGuardParseError, match="unknown category code 'S14'"):
        parse_llama_guard_output("unsafe\nS14", valid_codes=offered)
    with pytest.raises(LlamaGuardParseError):  # an excluded category is not an answer either
        parse_llama_guard_output("unsafe\nS6", valid_codes=("S1", "S2"))


def test_all_codes_are_s1_to_s14() -> None:
    assert tuple(f"S{i}" for i in range(1, 15)) == ALL_CODES
    assert issubclass(LlamaGuardParseError, ValueError)
