"""The engine on a tiny random Llama: batching that matches `generate`, mixed adapters, stopping, limits,
cancellation, queue overflow, draining, and failures."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from loraserve.config import EngineConfig
from loraserve.errors import AdapterNotFound, InvalidRequest, QueueFull, Unavailable
from loraserve.server.engine.engine import Engine, EngineState
from loraserve.server.engine.outputs import StopReason
from loraserve.server.engine.params import GenerationRequest, OutputOptions, SamplingParams, StoppingParams

PROMPTS = [
    "The quick brown fox",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole",
    "1 2 3",
    "Once upon a time, in a kingdom by the sea, a princess",
    "def main():",
]


def exact(n: int) -> StoppingParams:
    return StoppingParams(max_new_tokens=n, min_new_tokens=n)


def with_ids(**kwargs: object) -> GenerationRequest:
    return GenerationRequest(output=OutputOptions(token_ids=True), **kwargs)


def test_mixed_batch_greedy_equals_generate(make_engine, reference, tiny_loaded) -> None:
    """Prompts of different lengths and lengths of output, joining at different steps, each equal to generate."""
    engine = make_engine(max_batch_size=4)  # 5 prompts: one has to wait and join when a slot frees
    lengths = [12, 5, 9, 16, 7]
    streams = []
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        streams.append(engine.submit(with_ids(prompt=prompt, stopping=exact(n))))
        if i == 1:
            time.sleep(0.05)  # let the first two start decoding, so the rest join a running batch
    for prompt, n, stream in zip(PROMPTS, lengths, streams, strict=True):
        result = stream.result()
        prompt_ids = engine.tokenization.encode(prompt)
        assert [t.id for t in result.tokens] == reference(prompt_ids, n)
        assert result.stop_reason is StopReason.MAX_TOKENS and result.generated_token_count == n


def test_adapters_and_base_share_a_batch_and_match_generate(make_engine, reference) -> None:
    engine = make_engine()
    cases = [("", PROMPTS[0]), ("alpha", PROMPTS[0]), ("beta", PROMPTS[0]), ("alpha", PROMPTS[1]), ("", PROMPTS[3])]
    streams = [engine.submit(with_ids(prompt=p, adapter_id=a, stopping=exact(8))) for a, p in cases]
    outputs = {}
    for (adapter, prompt), stream in zip(cases, streams, strict=True):
        ids = [t.id for t in stream.result().tokens]
        assert ids == reference(engine.tokenization.encode(prompt), 8, adapter), adapter
        outputs[(adapter, prompt)] = ids
    # the adapters really change the output, so the comparison above means something
    assert len({tuple(outputs[(a, PROMPTS[0])]) for a in ("", "alpha", "beta")}) == 3


def test_stream_chunks_add_up_to_the_result(make_engine) -> None:
    engine = make_engine()
    request = GenerationRequest(prompt=PROMPTS[1], stopping=exact(24))
    chunks = list(engine.submit(request))
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.generated_token_count for c in chunks] == list(range(1, 25))
    assert "".join(c.text for c in chunks) == engine.submit(request).result().text


def test_seeded_sampling_repeats_and_reports_its_seed(make_engine) -> None:
    engine = make_engine()
    request = GenerationRequest(
        prompt=PROMPTS[0],
        sampling=SamplingParams(temperature=1.0, seed=1234),
        stopping=exact(10),
        output=OutputOptions(token_ids=True),
    )
    first, second = engine.submit(request), engine.submit(request)  # decoded side by side in one batch
    a, b = first.result(), second.result()
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
    assert a.seed == 1234
    unseeded = engine.submit(dataclasses.replace(request, sampling=SamplingParams(temperature=1.0))).result()
    assert unseeded.seed is not None
    assert engine.submit(GenerationRequest(prompt="x", stopping=exact(2))).result().seed is None


def test_stop_sequences_cut_the_text(make_engine) -> None:
    engine = make_engine()
    full = engine.submit(GenerationRequest(prompt=PROMPTS[3], stopping=exact(30))).result().text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the random model's text should have a non-blank middle"
    cut = engine.submit(
        GenerationRequest(
            prompt=PROMPTS[3], stopping=StoppingParams(max_new_tokens=30, stop_sequences=("\x00never", stop))
        )
    ).result()
    assert cut.stop_reason is StopReason.STOP_SEQUENCE and cut.stop_sequence == stop
    assert cut.text == full[: full.index(stop)]
    kept = engine.submit(
        GenerationRequest(
            prompt=PROMPTS[3],
            stopping=StoppingParams(max_new_tokens=30, stop_sequences=(stop,), include_stop_sequence=True),
        )
    ).result()
    assert kept.text == full[: full.index(stop) + len(stop)]
    streamed = "".join(
        c.text
        for c in engine.submit(
            GenerationRequest(prompt=PROMPTS[3], stopping=StoppingParams(max_new_tokens=30, stop_sequences=(stop,)))
        )
    )
    assert streamed == cut.text, "streamed text must never include what the stop sequence cuts"


def test_eos_ends_generation_unless_min_new_tokens(make_engine, tiny_loaded) -> None:
    engine = make_engine()
    first = engine.submit(with_ids(prompt=PROMPTS[0], stopping=exact(3))).result().tokens[0].id
    # Declare the model's first greedy token an end-of-sequence token: the request ends right there...
    eos_first = dataclasses.replace(tiny_loaded, eos_token_ids=frozenset({first}))
    eos_engine = make_engine(loaded=eos_first)
    ended = eos_engine.submit(with_ids(prompt=PROMPTS[0], stopping=StoppingParams(max_new_tokens=10))).result()
    assert ended.stop_reason is StopReason.EOS_TOKEN and ended.generated_token_count == 1 and ended.text == ""
    # ...unless min_new_tokens holds it off: then that token is never chosen before the minimum.
    held = eos_engine.submit(
        with_ids(prompt=PROMPTS[0], stopping=StoppingParams(max_new_tokens=10, min_new_tokens=4))
    ).result()
    assert held.generated_token_count >= 4
    assert first not in [t.id for t in held.tokens[:4]]


def test_time_limit_and_token_limit(make_engine) -> None:
    engine = make_engine(max_new_tokens=2048)
    timed = engine.submit(
        GenerationRequest(
            prompt=PROMPTS[0], stopping=StoppingParams(max_new_tokens=2000, min_new_tokens=2000, time_limit_ms=50)
        )
    ).result()
    assert timed.stop_reason is StopReason.TIME_LIMIT and timed.generated_token_count < 2000
    long_prompt = " ".join(["word"] * 240)
    limited = engine.submit(GenerationRequest(prompt=long_prompt, stopping=exact(100))).result()
    assert limited.stop_reason is StopReason.TOKEN_LIMIT
    assert limited.input_token_count + limited.generated_token_count == 256  # the tiny model's context


def test_prompt_too_long_is_refused_unless_truncated(make_engine) -> None:
    engine = make_engine()
    too_long = " ".join(["word"] * 400)
    with pytest.raises(InvalidRequest, match="truncate_input_tokens") as error:
        engine.submit(GenerationRequest(prompt=too_long))
    assert error.value.field == "prompt"
    result = engine.submit(GenerationRequest(prompt=too_long, truncate_input_tokens=100, stopping=exact(2))).result()
    assert result.input_token_count == 100


@pytest.mark.parametrize(
    ("request_", "error", "field"),
    [
        (
            GenerationRequest(prompt="x", stopping=StoppingParams(max_new_tokens=65)),
            InvalidRequest,
            "stopping.max_new_tokens",
        ),
        (
            GenerationRequest(prompt="x", stopping=StoppingParams(min_new_tokens=40)),
            InvalidRequest,
            "stopping.min_new_tokens",
        ),
        (
            GenerationRequest(prompt="x", stopping=StoppingParams(stop_sequences=("a", "b", "c"))),
            InvalidRequest,
            "stopping.stop_sequences",
        ),
        (
            GenerationRequest(prompt="x", stopping=StoppingParams(stop_sequences=("x" * 11,))),
            InvalidRequest,
            "stopping.stop_sequences[0]",
        ),
        (GenerationRequest(prompt="x", output=OutputOptions(top_n=3)), InvalidRequest, "response.top_n"),
        (GenerationRequest(prompt="x", adapter_id="../alpha"), InvalidRequest, "adapter_id"),
        (GenerationRequest(prompt="x", adapter_id="gamma"), AdapterNotFound, None),
    ],
)
def test_requests_beyond_the_limits_are_refused(make_engine, request_, error, field) -> None:
    engine = make_engine(
        max_new_tokens=64, default_max_new_tokens=32, max_stop_sequences=2, max_stop_sequence_length=10, max_top_n=2
    )
    with pytest.raises(error) as raised:
        engine.submit(request_)
    if field:
        assert raised.value.field == field
    assert engine.stats().queued_requests == 0


def test_cancel_leaves_the_batch_within_a_step(make_engine) -> None:
    engine = make_engine()
    step = engine._runner.step

    def slow_step(work):
        time.sleep(0.02)  # slow enough for the test to read every chunk as it comes
        return step(work)

    engine._runner.step = slow_step
    other = engine.submit(GenerationRequest(prompt=PROMPTS[1], stopping=exact(40)))
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(200)))
    chunks = iter(stream)
    seen = next(chunks)
    while seen.generated_token_count < 3:
        seen = next(chunks)
    assert engine.stats().active_requests == 2
    stream.cancel()
    rest = list(chunks)
    # At most the step already running when cancel() came adds a token (plus one chunk not read yet).
    assert rest[-1].stop_reason is StopReason.CANCELLED and rest[-1].generated_token_count <= 3 + 2
    assert other.result().generated_token_count == 40, "the other request is unharmed"
    deadline = time.monotonic() + 5
    while engine.stats().active_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().active_requests == 0


def test_expired_deadline_ends_the_request(make_engine) -> None:
    engine = make_engine()
    result = engine.submit(GenerationRequest(prompt="x", deadline=time.monotonic() - 1, stopping=exact(50))).result()
    assert result.stop_reason is StopReason.CANCELLED and result.generated_token_count == 0


def test_full_queue_refuses_while_admitted_requests_finish(make_engine) -> None:
    engine = make_engine(max_batch_size=1, max_queued_requests=1)
    running = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(30)))
    next(iter(running))  # admitted and decoding
    waiting = engine.submit(GenerationRequest(prompt=PROMPTS[1], stopping=exact(5)))
    with pytest.raises(QueueFull, match="retry later"):
        engine.submit(GenerationRequest(prompt=PROMPTS[2]))
    assert engine.stats().queued_requests == 1
    assert running.result().generated_token_count == 30, "the admitted request is unharmed"
    assert waiting.result().generated_token_count == 5


def test_drain_refuses_new_requests_and_finishes_old_ones(make_engine) -> None:
    engine = make_engine()
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(20)))
    engine.drain()
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(GenerationRequest(prompt="x"))
    assert stream.result().generated_token_count == 20
    assert engine.wait_idle(5)
    assert engine.state is EngineState.DRAINING


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, monkeypatch) -> None:
    engine = make_engine()
    runner = engine._runner
    real_step = runner.step
    monkeypatch.setattr(runner, "step", lambda work: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="the model failed while running this request"):
        engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result()
    monkeypatch.setattr(runner, "step", real_step)
    assert engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result().generated_token_count == 5
    assert engine.alive


def test_a_dead_engine_fails_everything_and_says_so(tiny_loaded, monkeypatch) -> None:
    failures: list[BaseException] = []
    engine = Engine(tiny_loaded, EngineConfig(kv_cache_memory="64MB"), on_failure=failures.append)
    engine.start()
    entered = threading.Event()

    def broken_admit() -> None:
        entered.set()
        raise SystemError("scheduler bug")

    monkeypatch.setattr(engine, "_admit", broken_admit)
    with engine._cond:
        engine._cond.notify_all()
    stream = engine.submit(GenerationRequest(prompt="x", stopping=exact(5)))
    with pytest.raises(Unavailable, match="engine stopped"):
        stream.result()
    assert entered.is_set() and not engine.alive and isinstance(failures[0], SystemError)
    with pytest.raises(Unavailable):
        engine.submit(GenerationRequest(prompt="x"))
    engine.stop()


def test_token_details_and_input_tokens(make_engine) -> None:
    engine = make_engine()
    result = engine.submit(
        GenerationRequest(
            prompt=PROMPTS[0], stopping=exact(4), output=OutputOptions(logprobs=True, top_n=3, input_tokens=True)
        )
    ).result()
    assert len(result.tokens) == 4
    for token in result.tokens:
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_tokens) == 3 and token.top_tokens[0].logprob >= token.logprob - 1e-5
    assert [t.id for t in result.input_tokens] == engine.tokenization.encode(PROMPTS[0])
    assert "".join(t.text for t in result.input_tokens) == PROMPTS[0]


def test_tokenize_counts_like_generate(make_engine) -> None:
    engine = make_engine()
    count, details = engine.tokenize(PROMPTS[1], details=True)
    result = engine.submit(GenerationRequest(prompt=PROMPTS[1], stopping=exact(1))).result()
    assert count == result.input_token_count == len(details)


def test_long_prompts_are_prefilled_in_chunks(make_engine, reference) -> None:
    """Prompts longer than max_prefill_tokens join in pieces while another request decodes; outputs stay exact."""
    engine = make_engine(max_prefill_tokens=16)
    long_prompt = " ".join(f"word{i}" for i in range(60))
    runner_calls: list[int] = []
    step = engine._runner.step

    def counting_step(work):
        runner_calls.append(sum(len(w.tokens) for w in work if len(w.tokens) > 1))
        return step(work)

    engine._runner.step = counting_step
    decoding = engine.submit(with_ids(prompt=PROMPTS[0], stopping=exact(30)))
    next(iter(decoding))
    chunked = engine.submit(with_ids(prompt=long_prompt, stopping=exact(8)))
    ids = engine.tokenization.encode(long_prompt)
    assert [t.id for t in chunked.result().tokens] == reference(ids, 8)
    assert [t.id for t in decoding.result().tokens] == reference(engine.tokenization.encode(PROMPTS[0]), 30)[1:]
    assert max(runner_calls) <= 16 and sum(runner_calls) >= len(ids)


def test_fixed_shape_decode_steps_match_generate(make_engine, reference) -> None:
    """The padded, bucketed decode path that CUDA graphs replay gives the same tokens (run eagerly on a CPU)."""
    from loraserve.server.models.cuda_graphs import DecodeGraphs

    engine = make_engine(max_batch_size=6)
    graphs = DecodeGraphs(engine._runner, max_batch_size=6, capture=False)
    used: list[int] = []
    graph_step = graphs.step

    def counting(work):
        logits = graph_step(work)
        used.append(logits is not None)
        return logits

    graphs.step = counting
    engine._graphs = graphs
    cases = [("", PROMPTS[0]), ("alpha", PROMPTS[1]), ("beta", PROMPTS[2]), ("", PROMPTS[4]), ("alpha", PROMPTS[3])]
    streams = [
        engine.submit(with_ids(prompt=p, adapter_id=a, stopping=exact(10 + i))) for i, (a, p) in enumerate(cases)
    ]
    for i, ((adapter, prompt), stream) in enumerate(zip(cases, streams, strict=True)):
        assert [t.id for t in stream.result().tokens] == reference(engine.tokenization.encode(prompt), 10 + i, adapter)
    assert sum(used) > 5, "most decode steps went through the fixed-shape path"
