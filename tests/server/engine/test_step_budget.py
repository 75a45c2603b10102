"""The step budget: the cost model learns fixed and per-token step time, and prompt tokens are sized so that a step
that prefills takes at most decode_latency_factor times a decode-only step, except in a burst of prompts."""

from __future__ import annotations

import pytest

from loraserve.server.engine.step_budget import BURST_MIN_PROMPTS, StepBudget, StepCostModel


def test_the_cost_model_recovers_fixed_and_per_token_time() -> None:
    model = StepCostModel()
    assert model.fit() is None
    for tokens in [8, 40, 16, 200, 32, 120] * 10:
        model.observe(tokens, 0.010 + 0.0005 * tokens)
    fixed, per_token = model.fit()
    assert fixed == pytest.approx(0.010, rel=1e-6) and per_token == pytest.approx(0.0005, rel=1e-6)


def test_steps_of_one_size_teach_nothing() -> None:
    model = StepCostModel()
    for _ in range(20):
        model.observe(32, 0.05)
    assert model.fit() is None


def test_prefill_budget_keeps_the_step_within_the_latency_factor() -> None:
    budget = StepBudget(max_prefill_tokens=512, min_prefill_tokens=16, decode_latency_factor=2.0, prefill_burst_ratio=0)
    assert budget.prefill_tokens(decoding_rows=0, prefilling_rows=3) == 512  # nobody is waiting on a token
    assert budget.prefill_tokens(decoding_rows=8, prefilling_rows=1) == 16  # nothing learned yet: small chunks
    for tokens in [8, 40, 16, 200, 32, 120] * 10:
        budget.observe(tokens, 0.020 + 0.001 * tokens)
    # 10 decoding + 2 prefilling: their decode step takes 0.032 s; factor 2 allows 0.064 s: 44 tokens, 10 of them decode
    assert budget.prefill_tokens(decoding_rows=10, prefilling_rows=2) == 34
    # many prompts behind a few streams, bursts off: the batch being formed is large, so is the paced budget
    assert budget.prefill_tokens(decoding_rows=2, prefilling_rows=30) == 82
    many = StepBudget(max_prefill_tokens=64, min_prefill_tokens=16, decode_latency_factor=8.0, prefill_burst_ratio=0)
    for tokens in [8, 40, 16, 200] * 10:
        many.observe(tokens, 0.020 + 0.001 * tokens)
    assert many.prefill_tokens(decoding_rows=10, prefilling_rows=1) == 64  # capped by max_prefill_tokens
    slow = StepBudget(max_prefill_tokens=512, min_prefill_tokens=16, decode_latency_factor=1.0, prefill_burst_ratio=0)
    for tokens in [8, 40, 16, 200] * 10:
        slow.observe(tokens, 0.020 + 0.001 * tokens)
    assert slow.prefill_tokens(decoding_rows=32, prefilling_rows=1) == 16  # never below the minimum


def learned_budget(burst_ratio: float) -> StepBudget:
    budget = StepBudget(
        max_prefill_tokens=512, min_prefill_tokens=16, decode_latency_factor=2.0, prefill_burst_ratio=burst_ratio
    )
    for tokens in [8, 40, 16, 200, 32, 120] * 10:
        budget.observe(tokens, 0.020 + 0.001 * tokens)
    return budget


def test_a_burst_of_prompts_is_fed_at_full_size() -> None:
    budget = learned_budget(burst_ratio=0.3)
    paced = learned_budget(burst_ratio=0)
    # 30 prompts behind 2 streams: a burst, so the step takes max_prefill_tokens instead of the paced 82
    assert paced.prefill_tokens(decoding_rows=2, prefilling_rows=30) == 82
    assert budget.prefill_tokens(decoding_rows=2, prefilling_rows=30) == 512
    # still a burst at exactly the ratio: 6 prompts against 20 streams
    assert budget.prefill_tokens(decoding_rows=20, prefilling_rows=6) == 512
    # below the ratio the pacing holds: 5 prompts against 20 streams get what they would without bursts
    assert budget.prefill_tokens(decoding_rows=20, prefilling_rows=5) == paced.prefill_tokens(20, 5) < 512


def test_a_few_arrivals_are_never_a_burst() -> None:
    budget = learned_budget(burst_ratio=0.3)
    paced = learned_budget(burst_ratio=0)
    few = BURST_MIN_PROMPTS - 1
    assert budget.prefill_tokens(decoding_rows=1, prefilling_rows=few) == paced.prefill_tokens(1, few) < 512
    assert budget.prefill_tokens(decoding_rows=1, prefilling_rows=BURST_MIN_PROMPTS) == 512
