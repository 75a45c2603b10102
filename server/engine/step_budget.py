"""How many prompt tokens a step may take, so that running streams keep their pace while new prompts prefill.

Every step feeds the decoding rows first. Prompt tokens then fill the step up to a time budget: a step may take at
most `decode_latency_factor` times as long as a decode-only step of the batch being formed would, that is of every
running request, those still prefilling included: the pace each stream will get once they all decode. Measuring
against the decoding rows alone would starve a burst of prompts while a few streams decode, and keep the batch small
(measured: a third less throughput for 32 streams arriving together); measuring against a full batch would let a
prefill step take many times a light load's decode step (measured: inter-token p95 3.6x p50 under Poisson arrivals).
The cost of a step is
learned from the steps themselves: an exponentially weighted least-squares fit of `seconds = fixed + per_token x
tokens`, refreshed every step, so the budget follows the machine, the model and whatever else runs on the host. With
no stream decoding, a step takes up to max_prefill_tokens prompt tokens. At least `min_prefill_tokens` go in every
step, so prompts always progress.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the past in the fit: about the last 50 steps count.
FORGET = 0.98


@dataclass
class StepCostModel:
    """An exponentially weighted linear fit of step seconds against step tokens."""

    weight: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        for name, value in (
            ("weight", 1.0),
            ("sum_x", tokens),
            ("sum_y", seconds),
            ("sum_xx", tokens * tokens),
            ("sum_xy", tokens * seconds),
        ):
            setattr(self, name, getattr(self, name) * FORGET + value)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None until the steps seen differ enough in size to tell."""
        if self.weight < 2:
            return None
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        variance = self.sum_xx / self.weight - mean_x * mean_x
        if variance < 1.0:
            return None
        per_token = (self.sum_xy / self.weight - mean_x * mean_y) / variance
        if per_token <= 0:
            return None
        return max(mean_y - per_token * mean_x, 0.0), per_token


class StepBudget:
    """Prompt tokens for the next step, given how many rows decode in it."""

    def __init__(self, max_prefill_tokens: int, min_prefill_tokens: int, decode_latency_factor: float) -> None:
        self.max_prefill_tokens = max_prefill_tokens
        self.min_prefill_tokens = min(min_prefill_tokens, max_prefill_tokens)
        self.decode_latency_factor = decode_latency_factor
        self.cost = StepCostModel()

    def prefill_tokens(self, decoding_rows: int, prefilling_rows: int) -> int:
        """For a step with `decoding_rows` decoding requests and `prefilling_rows` requests whose prompts are not
        all in yet."""
        if decoding_rows == 0:
            return self.max_prefill_tokens
        fit = self.cost.fit()
        if fit is None:  # nothing learned yet: small chunks, and learn from them
            return self.min_prefill_tokens
        fixed, per_token = fit
        step_seconds = self.decode_latency_factor * (fixed + per_token * (decoding_rows + prefilling_rows))
        allowed = (step_seconds - fixed) / per_token - decoding_rows
        return int(min(max(allowed, self.min_prefill_tokens), self.max_prefill_tokens))

    def observe(self, tokens: int, seconds: float) -> None:
        """Learn from a step that fed `tokens` tokens in `seconds`."""
        self.cost.observe(tokens, seconds)
