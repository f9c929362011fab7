from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(demo_model_dir)


def _stream(
    tokenizer, text: str, stop: tuple[str, ...] = ()
) -> tuple[list[str], IncrementalDetokenizer]:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta = detok.add(token)
        if delta:
            deltas.append(delta)
        if detok.stopped:
            break
    tail = detok.flush()
    if tail:
        deltas.append(tail)
    return deltas, detok


@pytest.mark.parametrize(
    "text", ["café naïve 日本語 🎉🎉 done", "plain ascii text", "ünïcödé ✓ 😀x"]
)
def test_multibyte_text_never_split(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The tokenizer really does split some characters across tokens (else the test proves nothing).
    partial = [tokenizer.decode([i]) for i in ids]
    if any(not c.isascii() for c in text):
        assert any(REPLACEMENT_CHAR in p for p in partial)
    deltas, _ = _stream(tokenizer, text)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_is_cut_and_never_released(tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas, detok = _stream(tokenizer, "hello world STOP and more text", stop=("STOP",))
    assert "".join(deltas) == "hello world "
    assert detok.stopped
    assert all("S" not in d for d in deltas)


def test_partial_stop_string_is_held_then_released(tokenizer) -> None:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(tokenizer, ("xyz!",))
    released = ""
    for token in tokenizer("abc xyz", add_special_tokens=False)["input_ids"]:
        released += detok.add(token)
    assert released == "abc "  # "xyz" could still become the stop string
    assert released + detok.flush() == "abc xyz"


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas, detok = _stream(tokenizer, "one two three four", stop=("four", "two"))
    assert "".join(deltas) == "one "
    assert detok.text == "one "
