"""Request validation: each bad value raises InvalidRequest naming the contract's field."""

from __future__ import annotations

import math

import pytest

from loraserve.errors import InvalidRequest
from loraserve.prompting import Message
from loraserve.server.engine.params import GenerationRequest, OutputOptions, SamplingParams, StoppingParams


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: SamplingParams(temperature=-0.1), "sampling.temperature"),
        (lambda: SamplingParams(temperature=math.nan), "sampling.temperature"),
        (lambda: SamplingParams(temperature=math.inf), "sampling.temperature"),
        (lambda: SamplingParams(top_p=0.0), "sampling.top_p"),
        (lambda: SamplingParams(top_p=1.01), "sampling.top_p"),
        (lambda: SamplingParams(top_p=math.nan), "sampling.top_p"),
        (lambda: SamplingParams(top_k=-1), "sampling.top_k"),
        (lambda: SamplingParams(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (lambda: StoppingParams(max_new_tokens=0), "stopping.max_new_tokens"),
        (lambda: StoppingParams(max_new_tokens=4, min_new_tokens=5), "stopping.min_new_tokens"),
        (lambda: StoppingParams(stop_sequences=("ok", "")), "stopping.stop_sequences[1]"),
        (lambda: OutputOptions(top_n=-1), "response.top_n"),
        (lambda: GenerationRequest(), "prompt"),
        (lambda: GenerationRequest(prompt="   "), "prompt"),
        (lambda: GenerationRequest(prompt="a", messages=(Message("user", "b"),)), "prompt"),
        (lambda: GenerationRequest(messages=(Message("bot", "b"),)), "messages[0].role"),
    ],
)
def test_invalid_values_name_their_field(make, field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        make()
    assert error.value.field == field


def test_valid_requests_and_their_defaults() -> None:
    request = GenerationRequest(prompt="Hello")
    assert request.sampling.greedy
    assert request.stopping.max_new_tokens is None
    assert not request.output.token_details
    assert SamplingParams(temperature=0.7, top_p=1.0, top_k=0, seed=2**64 - 1).greedy is False
    assert OutputOptions(top_n=2).token_details
