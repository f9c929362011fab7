"""The token ledger: what admission reserves, what usage reports, what settlement charges."""

from __future__ import annotations

from gateway.token_ledger import TokenLedger
from model.engine import Finished


def ledger(counts_placeholders: bool = True) -> TokenLedger:
    # 30 text tokens with 2 image placeholders; the images are 2 x 17 vision tokens.
    return TokenLedger.admitted(
        text_tokens=30,
        images=2,
        image_tokens=34,
        choices=2,
        max_tokens=16,
        counts_placeholders=counts_placeholders,
    )


def test_admission_counts_each_image_as_its_vision_tokens() -> None:
    tokens = ledger()
    assert tokens.prompt == 30 - 2 + 34
    assert tokens.reserved_completion == 2 * 16
    assert tokens.completion == 0 and tokens.total == tokens.prompt


def test_streamed_deltas_count_until_the_engine_gives_the_exact_count() -> None:
    tokens = ledger()
    for _ in range(3):
        tokens.streamed(0)
    tokens.streamed(1)
    assert tokens.completion == 4  # what a client that leaves now is charged for
    tokens.finish(0, Finished("stop", 31, 5))
    assert tokens.completion_per_choice == [5, 1]
    assert tokens.prompt == 31 - 2 + 34  # the engine's count, images as their vision tokens
    assert tokens.total == tokens.prompt + 6


def test_a_merged_delta_counts_its_tokens() -> None:
    tokens = ledger()
    tokens.streamed(0, 3)  # an upstream's three deltas of one read, merged
    tokens.streamed(0)
    assert tokens.completion_per_choice == [4, 0]


def test_an_upstreams_prompt_count_is_taken_as_it_is() -> None:
    tokens = ledger(counts_placeholders=False)
    tokens.finish(0, Finished("stop", 40, 3))
    tokens.finish(1, Finished("length", 40, 16))
    assert (tokens.prompt, tokens.completion) == (40, 19)


def test_usage_is_the_openai_shape() -> None:
    tokens = ledger()
    tokens.finish(0, Finished("stop", 30, 2))
    tokens.finish(1, Finished("stop", 30, 3))
    assert tokens.usage() == {
        "prompt_tokens": 62,
        "completion_tokens": 5,
        "total_tokens": 67,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 34},
        "completion_tokens_details": None,
    }
