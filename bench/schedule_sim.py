"""Simulate the engine's scheduling policy (the real StepBudget) on a step-cost model, to compare policies in seconds
instead of benchmark runs: closed-loop streams, and the Poisson arrivals of bench/throughput.py.

The cost model was fitted to the runner's measured steps (default model, float32, a 2-core AMD EPYC): a step costs
OVERHEAD + 31 ms + 2.46 ms per decoding row + (1.36 ms per prompt token + 26 ms when it feeds prompt tokens). It
predicts the pacing policy's 32-stream figure (134 tok/s) and Poisson inter-token p95/p50 (2.0-2.3) close to what
bench/throughput.py measured. Absolute figures are the model's; compare policies with each other.

    .venv/bin/python bench/schedule_sim.py --ratios 0 0.3 0.5
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass, field

from loraserve.server.engine.step_budget import StepBudget

PROMPT_TOKENS, NEW_TOKENS, MAX_BATCH = 128, 64, 32


def step_seconds(decoding: int, prompt_tokens: int, overhead_ms: float) -> float:
    prefill = 1.36 * prompt_tokens + 26 if prompt_tokens else 0.0
    return (overhead_ms + 31 + 2.46 * decoding + prefill) / 1000


@dataclass
class Request:
    arrival: float
    stream: int | None = None
    fed: int = 0
    token_times: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    tokens_per_second: float
    steps: int
    ttft_p50: float
    itl_p50: float
    itl_p95: float


def simulate(budget: StepBudget, overhead_ms: float, streams: int = 0, arrivals: list[float] | None = None) -> Outcome:
    """Closed loop (`streams` streams of 2 requests each) or open loop (requests at `arrivals` seconds)."""
    for tokens in (40, 200, 60, 300):  # a warm engine has a fit
        budget.observe(tokens, step_seconds(0, tokens, overhead_ms))
    pending = sorted(arrivals or [])
    waiting = [Request(0.0, stream) for stream in range(streams)]
    second_requests = set(range(streams))
    running: list[Request] = []
    done: list[Request] = []
    now, steps = 0.0, 0
    while waiting or running or pending:
        while pending and pending[0] <= now:
            waiting.append(Request(pending.pop(0)))
        while waiting and len(running) < MAX_BATCH:
            running.append(waiting.pop(0))
        if not running:
            now = pending[0]
            continue
        decoding = [r for r in running if r.fed == PROMPT_TOKENS]
        prefilling = [r for r in running if r.fed < PROMPT_TOKENS]
        left = budget.prefill_tokens(len(decoding), len(prefilling))
        chunks = []
        for request in prefilling:
            if left <= 0:
                break
            take = min(left, PROMPT_TOKENS - request.fed)
            left -= take
            chunks.append((request, take))
        fed = sum(take for _, take in chunks)
        seconds = step_seconds(len(decoding), fed, overhead_ms)
        budget.observe(len(decoding) + fed, seconds)
        now += seconds
        steps += 1
        for request in decoding:
            request.token_times.append(now)
        for request, take in chunks:
            request.fed += take
            if request.fed == PROMPT_TOKENS:
                request.token_times.append(now)
        for request in [r for r in running if len(r.token_times) >= NEW_TOKENS]:
            running.remove(request)
            done.append(request)
            if request.stream in second_requests:
                second_requests.discard(request.stream)
                waiting.append(Request(now, request.stream))
    gaps = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    return Outcome(
        tokens_per_second=len(done) * NEW_TOKENS / now,
        steps=steps,
        ttft_p50=statistics.median(r.token_times[0] - r.arrival for r in done),
        itl_p50=statistics.median(gaps),
        itl_p95=statistics.quantiles(gaps, n=20)[18],
    )


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    moments, moment = [], 0.0
    for _ in range(count):
        moments.append(moment)
        moment += rng.expovariate(rate)
    return moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.3], help="--prefill-burst-ratio values")
    parser.add_argument("--decode-latency-factor", type=float, default=2.0)
    parser.add_argument("--max-prefill-tokens", type=int, default=512)
    parser.add_argument("--overhead-ms", type=float, default=15.0, help="the server's own cost per step")
    parser.add_argument("--seeds", type=int, default=5, help="Poisson arrival sequences per policy")
    args = parser.parse_args()

    def budget(ratio: float) -> StepBudget:
        return StepBudget(args.max_prefill_tokens, 16, args.decode_latency_factor, ratio)

    for ratio in args.ratios:
        closed32 = simulate(budget(ratio), args.overhead_ms, streams=32)
        closed16 = simulate(budget(ratio), args.overhead_ms, streams=16)
        rate = 0.8 * closed16.tokens_per_second / NEW_TOKENS  # as bench/throughput.py offers it
        poisson = [
            simulate(budget(ratio), args.overhead_ms, arrivals=poisson_arrivals(rate, 48, seed))
            for seed in range(args.seeds)
        ]
        print(
            f"ratio {ratio}: 32 streams {closed32.tokens_per_second:.1f} tok/s in {closed32.steps} steps, "
            f"16 streams {closed16.tokens_per_second:.1f} tok/s; Poisson {rate:.2f}/s: TTFT p50 "
            + " ".join(f"{p.ttft_p50:.2f}" for p in poisson)
            + " s, inter-token p95/p50 "
            + " ".join(f"{p.itl_p95 / p.itl_p50:.2f}" for p in poisson)
        )


if __name__ == "__main__":
    main()
