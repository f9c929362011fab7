from __future__ import annotations

import torch

from model.engine import SamplingParams
from model.fast.sampling import SlotSampler
from model.sampling import TokenSampler


def test_greedy_takes_argmax() -> None:
    sampler = TokenSampler(SamplingParams(max_tokens=1, temperature=0.0), vocab_size=4)
    assert sampler.sample(torch.tensor([0.1, 2.0, 1.9, -1.0])) == 1


def test_presence_penalty_moves_greedy_choice() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, presence_penalty=0.5)
    sampler = TokenSampler(params, vocab_size=3)
    logits = torch.tensor([1.0, 0.8, 0.0])
    assert sampler.sample(logits) == 0
    sampler.observe(0)
    assert sampler.sample(logits) == 1


def test_frequency_penalty_grows_with_count() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=0.15)
    sampler = TokenSampler(params, vocab_size=2)
    logits = torch.tensor([1.0, 0.8])
    sampler.observe(0)
    assert sampler.sample(logits) == 0  # 0.85 > 0.8
    sampler.observe(0)
    assert sampler.sample(logits) == 1  # 0.70 < 0.8


def test_top_p_keeps_only_the_nucleus() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=1)
    sampler = TokenSampler(params, vocab_size=3)
    logits = torch.tensor([5.0, 0.0, 0.0])  # p(0) ~ 0.987
    assert {sampler.sample(logits) for _ in range(200)} == {0}


def test_a_top_p_too_small_for_float32_keeps_the_top_token() -> None:
    """5e-324 is a valid top_p (> 0) that float32 rounds to 0: the nucleus is still the top
    token, never an empty distribution (a 500 found by the OpenAPI fuzz)."""
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=5e-324, seed=1)
    sampler = TokenSampler(params, vocab_size=3)
    logits = torch.tensor([0.0, 2.0, 1.0])
    assert {sampler.sample(logits) for _ in range(20)} == {1}
    slots = SlotSampler(slots=4, vocab_size=3, device=torch.device("cpu"))
    for slot in range(4):
        slots.reset(slot, params)
    assert set(slots.sample(logits[None].expand(4, 3), [0, 1, 2, 3])) == {1}


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.zeros(50)
    draws = []
    for _ in range(2):
        sampler = TokenSampler(SamplingParams(max_tokens=1, seed=1234), vocab_size=50)
        draws.append([sampler.sample(logits) for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_logits_beyond_vocab_are_ignored() -> None:
    # The image token id (== vocab size) must never be sampled even if a row is longer.
    sampler = TokenSampler(SamplingParams(max_tokens=1, temperature=0.0), vocab_size=3)
    assert sampler.sample(torch.tensor([0.0, 1.0, 0.5, 9.0])) == 1


def test_a_tiny_temperature_is_greedy_not_an_overflow() -> None:
    sampler = TokenSampler(SamplingParams(max_tokens=1, temperature=1e-40), vocab_size=3)
    assert sampler.sample(torch.tensor([0.0, 50.0, 3.0])) == 1
