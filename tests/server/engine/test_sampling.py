"""Per-row sampling: greedy, seeded sampling, top-k/top-p filters, repetition penalty, suppressed tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from loraserve.errors import InvalidRequest
from loraserve.server.engine.params import SamplingParams
from loraserve.server.engine.sampling import RowSampler, RowStep, filter_top_k_top_p, sample_next

CPU = torch.device("cpu")


def row(**params: float) -> RowStep:
    return RowStep(sampler=RowSampler.create(SamplingParams(**params), CPU))


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample_next(logits, [row(), row()]).token_ids == [1, 0]


def test_a_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    alone = [sample_next(logits[1:2], [row(temperature=1.0, seed=42)]).token_ids[0] for _ in range(1)]
    sampler = RowSampler.create(SamplingParams(temperature=1.0, seed=42), CPU)
    in_batch = sample_next(logits, [row(), RowStep(sampler=sampler), row(temperature=1.0)]).token_ids[1]
    assert in_batch == alone[0]
    assert sampler.seed == 42


def test_an_unseeded_sampling_row_gets_a_seed_and_greedy_has_none() -> None:
    assert RowSampler.create(SamplingParams(temperature=0.5), CPU).seed is not None
    assert RowSampler.create(SamplingParams(), CPU).seed is None


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 500)
    expected = logits.argmax(dim=-1).tolist()
    rows = [row(temperature=2.0, top_k=1, seed=i) for i in range(2)] + [
        row(temperature=2.0, top_p=1e-6, seed=i) for i in range(2)
    ]
    assert sample_next(logits, rows).token_ids == expected


def test_filters_keep_exactly_what_they_should() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    kept = filter_top_k_top_p(scores, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False], [True, True, True, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_top_k_top_p(probs, torch.tensor([0]), torch.tensor([0.75]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]


def test_repetition_penalty_follows_hf_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.9, 0.0]])
    penalised = RowStep(sampler=RowSampler.create(SamplingParams(repetition_penalty=2.0), CPU), history=[0, 1])
    # token 0 drops from 2.0 to 1.0, below token 2 (1.9); token 1 goes from -2 to -4
    assert sample_next(logits, [penalised]).token_ids == [2]


def test_suppressed_tokens_are_never_chosen() -> None:
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    step = RowStep(sampler=RowSampler.create(SamplingParams(), CPU), suppressed_ids=(0,))
    assert sample_next(logits, [step]).token_ids == [1]


def test_logprobs_are_the_models_and_top_n_is_sorted() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    step = RowStep(sampler=RowSampler.create(SamplingParams(), CPU), logprobs=True, top_n=2)
    sampled = sample_next(logits, [step])
    expected = torch.log_softmax(logits, dim=-1)[0]
    assert sampled.logprobs[0] == pytest.approx(float(expected[0]))
    assert [i for i, _ in sampled.top_tokens[0]] == [0, 1]
    assert sampled.top_tokens[0][1][1] == pytest.approx(float(expected[1]))
    assert math.isclose(sum(math.exp(v) for v in expected.tolist()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_row_with_nan_or_inf_scores_gets_an_error_and_the_others_their_tokens(bad: float) -> None:
    logits = torch.randn(3, 50)
    logits[1, 7] = bad
    rows = [row(), row(temperature=1.0, seed=1), row(temperature=0.7, top_p=0.9, seed=2)]
    sampled = sample_next(logits, rows)
    assert set(sampled.errors) == {1} and "NaN or infinite" in str(sampled.errors[1])
    assert sampled.token_ids[1] == -1 and sampled.token_ids[0] == int(logits[0].argmax())
    assert 0 <= sampled.token_ids[2] < 50


def test_a_row_whose_scores_overflow_at_its_temperature_gets_an_error() -> None:
    logits = torch.tensor([[3e38, -3e38, 0.0], [1.0, 2.0, 3.0]])
    sampled = sample_next(logits, [row(temperature=1e-5, seed=1), row(temperature=1e-5, seed=1)])
    assert set(sampled.errors) == {0} and "overflow" in str(sampled.errors[0])
    assert sampled.token_ids == [-1, 2]


def test_a_row_with_every_token_suppressed_gets_an_error() -> None:
    logits = torch.randn(2, 4)
    suppressed = RowStep(sampler=RowSampler.create(SamplingParams(), CPU), suppressed_ids=(0, 1, 2, 3))
    sampled = sample_next(logits, [suppressed, row()])
    assert set(sampled.errors) == {0} and sampled.token_ids[1] == int(logits[1].argmax())


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6, 100.5, 1e308, math.nan, -0.1, math.inf])
def test_temperatures_where_the_arithmetic_breaks_are_refused(temperature: float) -> None:
    with pytest.raises(InvalidRequest, match=r"sampling\.temperature"):
        SamplingParams(temperature=temperature)


@pytest.mark.parametrize("penalty", [1e-40, 0.0, 0.009, 1e308, math.nan, math.inf, -1.0])
def test_repetition_penalties_where_the_arithmetic_breaks_are_refused(penalty: float) -> None:
    with pytest.raises(InvalidRequest, match=r"sampling\.repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)


@pytest.mark.parametrize("temperature", [0.0, -0.0, 1e-5, 1.0, 100.0])
def test_edge_temperatures_inside_the_range_sample_finite_tokens(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 1000) * 30
    params = {"temperature": temperature, "seed": 3, "repetition_penalty": 100.0, "top_p": 5e-324}
    step = RowStep(sampler=RowSampler.create(SamplingParams(**params), CPU), history=(1, 2, 3))
    sampled = sample_next(logits, [step])
    assert not sampled.errors and 0 <= sampled.token_ids[0] < 1000


def test_the_documented_bounds_are_taken_as_the_contracts_32_bit_floats_carry_them() -> None:
    """A client that sends temperature 1e-5 (or repetition_penalty 0.01) sends 9.99999975e-06 (0.00999999978)."""
    as_sent = [float(torch.tensor(v, dtype=torch.float32)) for v in (1e-5, 0.01)]
    assert as_sent[0] < 1e-5 and as_sent[1] < 0.01
    SamplingParams(temperature=as_sent[0], repetition_penalty=as_sent[1])
