"""The engine on the paged KV cache: blocks freed when requests end or are cancelled, preemption instead of failure
when the cache is full, prefix hits across requests (and never across adapters or adapter versions), and outputs
that equal greedy `generate` with the prefix cache on and off."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loraserve.errors import InvalidRequest
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.params import GenerationRequest, OutputOptions, StoppingParams
from loraserve.server.models.adapters.spec import AdapterSpec
from tests.conftest import HANG_GUARD_S, EngineGate, wait_for

SYSTEM = "You are a careful assistant. " * 12  # a shared head of ~70 tokens: four full blocks of 16
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Say hello.", "Count to three."]


def exact(n: int) -> StoppingParams:
    return StoppingParams(max_new_tokens=n, min_new_tokens=n)


def ask(engine: Engine, prompt: str, n: int, adapter: str = "") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, adapter_id=adapter, stopping=exact(n), output=OutputOptions(token_ids=True))


def ids(result) -> list[int]:  # type: ignore[no-untyped-def]
    return [t.id for t in result.tokens]


def blocks_of(make_engine, tokens: int) -> str:  # type: ignore[no-untyped-def]
    """A --kv-cache-memory that holds `tokens` positions (plus the scratch block) of the tiny model."""
    probe = make_engine()
    return str((tokens + probe.executor.kv.block_size) * probe.executor.kv.shape.bytes_per_token)


def test_finished_requests_leave_no_block_in_use(make_engine, reference) -> None:
    engine = make_engine()
    streams = [engine.submit(ask(engine, q, 6)) for q in QUESTIONS]  # all end in the same step
    for question, stream in zip(QUESTIONS, streams, strict=True):
        assert ids(stream.result()) == reference(engine.tokenization.encode(question), 6)
    wait_for(lambda: engine.stats().kv_cache_used_blocks == 0, "the finished requests' blocks to be freed")
    stats = engine.stats()
    assert stats.active_requests == 0 and stats.kv_cache_used_tokens == 0
    assert stats.kv_cache_blocks * stats.kv_cache_block_size == stats.kv_cache_tokens


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_full_cache_preempts_the_newest_request_and_outputs_stay_exact(
    make_engine, reference, prefix_caching: bool
) -> None:
    """10 blocks of 16 for 6 requests that each grow to 3-4 blocks: they cannot all run at once, so the newest are
    preempted and recomputed; every output still equals generate, and no request fails."""
    engine = make_engine(kv_cache_memory=blocks_of(make_engine, 160), prefix_caching=prefix_caching)
    assert engine.stats().kv_cache_blocks == 10
    prompts = [f"{i} {QUESTIONS[i % 4]}" for i in range(6)]
    streams = [engine.submit(ask(engine, p, 40)) for p in prompts]
    for prompt, stream in zip(prompts, streams, strict=True):
        assert ids(stream.result()) == reference(engine.tokenization.encode(prompt), 40)
    stats = engine.stats()
    assert stats.preemptions > 0
    wait_for(lambda: engine.stats().kv_cache_used_blocks == 0, "the finished requests' blocks to be freed")


def test_a_request_larger_than_the_whole_cache_is_refused_up_front(make_engine) -> None:
    engine = make_engine(kv_cache_memory=blocks_of(make_engine, 160))
    with pytest.raises(InvalidRequest, match="more than the whole KV cache holds") as error:
        engine.submit(GenerationRequest(prompt="hello", stopping=StoppingParams(max_new_tokens=200)))
    assert error.value.field == "stopping.max_new_tokens"


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_shared_prefix_is_computed_once(make_engine, reference, prefix_caching: bool) -> None:
    engine = make_engine(prefix_caching=prefix_caching)
    first = engine.submit(ask(engine, SYSTEM + QUESTIONS[0], 5)).result()
    assert first.cached_input_token_count == 0
    for question in QUESTIONS[1:]:
        prompt = SYSTEM + question
        result = engine.submit(ask(engine, prompt, 5)).result()
        assert ids(result) == reference(engine.tokenization.encode(prompt), 5)
        shared = len(engine.tokenization.encode(SYSTEM)) // 16 * 16
        if prefix_caching:
            assert shared >= 64 and result.cached_input_token_count >= shared - 16
        else:
            assert result.cached_input_token_count == 0
    stats = engine.stats()
    assert stats.prefix_caching is prefix_caching
    assert (stats.prefix_cache_hit_tokens > 0) is prefix_caching
    assert stats.prefix_cache_queried_tokens > stats.prefix_cache_hit_tokens


def test_the_same_prompt_hits_again_and_the_last_token_is_always_computed(make_engine, reference) -> None:
    engine = make_engine()
    prompt_ids = engine.tokenization.encode(SYSTEM)
    engine.submit(ask(engine, SYSTEM, 3)).result()
    again = engine.submit(ask(engine, SYSTEM, 3)).result()
    assert again.cached_input_token_count == (len(prompt_ids) - 1) // 16 * 16
    assert ids(again) == reference(prompt_ids, 3)


def test_no_hit_across_adapters(make_engine, reference) -> None:
    engine = make_engine()
    prompt = SYSTEM + QUESTIONS[0]
    engine.submit(ask(engine, prompt, 4)).result()
    alpha = engine.submit(ask(engine, prompt, 4, "alpha")).result()
    assert alpha.cached_input_token_count == 0
    assert ids(alpha) == reference(engine.tokenization.encode(prompt), 4, "alpha")
    assert engine.submit(ask(engine, prompt, 4, "alpha")).result().cached_input_token_count > 0


def test_an_adapter_reloaded_with_new_weights_never_reuses_its_old_blocks(
    make_engine, reference, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Same id, new weights: no reuse. Same weights under another id: reuse (blocks are keyed by content)."""
    engine = make_engine()
    prompt = SYSTEM + QUESTIONS[1]
    prompt_ids = engine.tokenization.encode(prompt)
    engine.load_adapter(AdapterSpec("gamma", str(adapter_dirs["alpha"])), tmp_path, None, None)
    engine.submit(ask(engine, prompt, 4, "gamma")).result()
    assert engine.submit(ask(engine, prompt, 4, "alpha")).result().cached_input_token_count > 0
    engine.unload_adapter("gamma", None)
    engine.load_adapter(AdapterSpec("gamma", str(adapter_dirs["beta"])), tmp_path, None, None)
    reloaded = engine.submit(ask(engine, prompt, 4, "gamma")).result()
    assert reloaded.cached_input_token_count == 0
    assert ids(reloaded) == reference(prompt_ids, 4, "beta")


def test_a_cancelled_request_frees_its_blocks_within_a_step(make_engine, monkeypatch) -> None:
    """Counted in steps, not seconds: the step running when cancel() comes is the request's last."""
    engine = make_engine()
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the request is mid-way, in a step, when it is cancelled
        stream = engine.submit(ask(engine, SYSTEM, 200))
        next(iter(stream))
        gate.wait_held("the step after the first token")
        assert engine.stats().kv_cache_used_blocks > 0
        engine.cancel(stream.request_id)
        steps = gate.steps
        gate.release()
        wait_for(lambda: engine.stats().kv_cache_used_blocks == 0, "the cancelled request's blocks to be freed")
    assert gate.steps - steps <= 1, f"{gate.steps - steps} steps ran after the one running when cancel() came"


def test_a_burst_of_cancelled_streams_leaks_no_block(make_engine) -> None:
    engine = make_engine(max_batch_size=8, kv_cache_memory=blocks_of(make_engine, 480))
    rng = random.Random(7)
    streams = [engine.submit(ask(engine, f"{i} " + SYSTEM[: rng.randrange(20, 300)], 60)) for i in range(24)]
    for stream in streams:
        if rng.random() < 0.5:
            next(iter(stream))  # some have started decoding, some are still queued
        engine.cancel(stream.request_id)
    assert engine.wait_idle(HANG_GUARD_S), f"hang guard: still busy after {HANG_GUARD_S:.0f} s"
    stats = engine.stats()
    assert (stats.active_requests, stats.queued_requests, stats.kv_cache_used_blocks) == (0, 0, 0)
