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

A burst of prompts is the exception (the role of TGI's --waiting-served-ratio): when the requests still prefilling
number at least `prefill_burst_ratio` times the decoding ones, and at least BURST_MIN_PROMPTS, a step takes up to
max_prefill_tokens prompt tokens whatever the decoding streams wait. Paced chunks would spread the burst over tens
of steps, so its requests start, and finish, staggered, and every later step runs a smaller batch (traced on the
benchmark's 32 closed-loop streams: 196 steps per 64 requests where 128 would do); the few streams already decoding
wait a few long steps instead. A lone arrival is never a burst, so under steady traffic the pacing above holds.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the past in the fit: about the last 50 steps count.
FORGET = 0.98
# Fewest prompts in flight that make a burst: one to three arrivals are paced. Simulated under the benchmark's Poisson
# arrivals (bench/schedule_sim.py, step costs fitted to the runner's measured steps), inter-token p95/p50 was
# 2.24-2.45 with bursts from two prompts, 2.06-2.43 from four, and 2.00-2.39 with pacing alone.
BURST_MIN_PROMPTS = 4


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

    def __init__(
        self,
        max_prefill_tokens: int,
        min_prefill_tokens: int,
        decode_latency_factor: float,
        prefill_burst_ratio: float,
    ) -> None:
        self.max_prefill_tokens = max_prefill_tokens
        self.min_prefill_tokens = min(min_prefill_tokens, max_prefill_tokens)
        self.decode_latency_factor = decode_latency_factor
        self.prefill_burst_ratio = prefill_burst_ratio
        self.cost = StepCostModel()

    def prefill_tokens(self, decoding_rows: int, prefilling_rows: int) -> int:
        """For a step with `decoding_rows` decoding requests and `prefilling_rows` requests whose prompts are not
        all in yet."""
        if decoding_rows == 0 or self.is_burst(decoding_rows, prefilling_rows):
            return self.max_prefill_tokens
        fit = self.cost.fit()
        if fit is None:  # nothing learned yet: small chunks, and learn from them
            return self.min_prefill_tokens
        fixed, per_token = fit
        step_seconds = self.decode_latency_factor * (fixed + per_token * (decoding_rows + prefilling_rows))
        allowed = (step_seconds - fixed) / per_token - decoding_rows
        return int(min(max(allowed, self.min_prefill_tokens), self.max_prefill_tokens))

    def is_burst(self, decoding_rows: int, prefilling_rows: int) -> bool:
        """Whether enough prompts are in flight, against the streams decoding, to feed them at full size."""
        return (
            self.prefill_burst_ratio > 0
            and prefilling_rows >= BURST_MIN_PROMPTS
            and prefilling_rows >= self.prefill_burst_ratio * decoding_rows
        )

    def observe(self, tokens: int, seconds: float) -> None:
        """Learn from a step that fed `tokens` tokens in `seconds`."""
        self.cost.observe(tokens, seconds)
