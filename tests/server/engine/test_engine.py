"""The engine on a tiny random Llama: batching that matches `generate`, mixed adapters, stopping, limits,
cancellation, queue overflow, draining, and failures."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time

import pytest
import torch

from loraserve.config import EngineConfig
from loraserve.errors import AdapterNotFound, InvalidRequest, ModelFailure, QueueFull, Unavailable
from loraserve.prompting import Message
from loraserve.server.engine.engine import Engine, EngineState
from loraserve.server.engine.outputs import GenerationChunk, StopReason
from loraserve.server.engine.params import GenerationRequest, OutputOptions, SamplingParams, StoppingParams
from loraserve.server.models.adapters.spec import AdapterSpec
from tests.conftest import HANG_GUARD_S, EngineGate

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


def test_mixed_batch_greedy_equals_generate(make_engine, reference, tiny_loaded, monkeypatch) -> None:
    """Prompts of different lengths and lengths of output, joining at different steps, each equal to generate."""
    engine = make_engine(max_batch_size=4)  # 5 prompts: one has to wait and join when a slot frees
    lengths = [12, 5, 9, 16, 7]
    streams = []
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the first two start decoding, so the rest join a running batch
        for i, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
            streams.append(engine.submit(with_ids(prompt=prompt, stopping=exact(n))))
            if i == 1:
                gate.wait_held("the first token")
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


def test_stream_chunks_add_up_to_the_result(make_engine, monkeypatch) -> None:
    engine = make_engine()
    request = GenerationRequest(prompt=PROMPTS[1], stopping=exact(24))
    chunks: list[GenerationChunk] = []
    with EngineGate(engine, monkeypatch) as gate:
        # A step waits for the reader to take the last step's token: however slow the reader, no two tokens are
        # coalesced into one chunk.
        gate.hold_when(lambda: engine.stats().generated_tokens > len(chunks))
        for chunk in engine.submit(request):
            chunks.append(chunk)
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


def test_cancel_leaves_the_batch_within_a_step(make_engine, monkeypatch) -> None:
    """Counted in steps, not seconds: cancelled during a step, a request gets at most that step's token."""
    engine = make_engine()
    seen: list[GenerationChunk] = []

    def three_tokens_out() -> bool:  # before each step, on the engine thread: what the stream has sent so far
        while (chunk := stream.take_nowait()) is not None:
            seen.append(chunk)
        return bool(seen) and seen[-1].generated_token_count >= 3

    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_when(lambda: True)  # nothing runs until both requests are in
        other = engine.submit(GenerationRequest(prompt=PROMPTS[1], stopping=exact(40)))
        stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(200)))
        gate.hold_when(three_tokens_out)  # then the engine stops in the step after the stream's third token
        gate.wait_held("the stream's third token")
        assert seen[-1].generated_token_count == 3 and engine.stats().active_requests == 2
        stream.cancel()
        gate.release()
        rest = list(stream)
    # The step already running when cancel() came may add a token; no step after it does.
    assert rest[-1].stop_reason is StopReason.CANCELLED and rest[-1].generated_token_count <= 3 + 1
    assert other.result().generated_token_count == 40, "the other request is unharmed"
    assert engine.wait_idle(HANG_GUARD_S), f"hang guard: still busy after {HANG_GUARD_S:.0f} s"
    assert engine.stats().active_requests == 0


def test_expired_deadline_ends_the_request(make_engine) -> None:
    engine = make_engine()
    result = engine.submit(GenerationRequest(prompt="x", deadline=time.monotonic() - 1, stopping=exact(50))).result()
    assert result.stop_reason is StopReason.CANCELLED and result.generated_token_count == 0


def test_full_queue_refuses_while_admitted_requests_finish(make_engine, monkeypatch) -> None:
    engine = make_engine(max_batch_size=1, max_queued_requests=1)
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the admitted request still decodes while the others come
        running = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(30)))
        next(iter(running))  # admitted and decoding
        waiting = engine.submit(GenerationRequest(prompt=PROMPTS[1], stopping=exact(5)))
        with pytest.raises(QueueFull, match="retry later"):
            engine.submit(GenerationRequest(prompt=PROMPTS[2]))
        assert engine.stats().queued_requests == 1
    assert running.result().generated_token_count == 30, "the admitted request is unharmed"
    assert waiting.result().generated_token_count == 5


def test_drain_refuses_new_requests_and_finishes_old_ones(make_engine, monkeypatch) -> None:
    engine = make_engine()
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_when(lambda: True)  # the request is still in flight when the drain starts
        stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(20)))
        engine.drain()
        with pytest.raises(Unavailable, match="shutting down"):
            engine.submit(GenerationRequest(prompt="x"))
    assert stream.result().generated_token_count == 20
    assert engine.wait_idle(HANG_GUARD_S), f"hang guard: still busy after {HANG_GUARD_S:.0f} s"
    assert engine.state is EngineState.DRAINING


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, monkeypatch) -> None:
    engine = make_engine(max_consecutive_failed_steps=2)
    runner = engine.executor
    real_step = runner.forward
    monkeypatch.setattr(runner, "forward", lambda work: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(ModelFailure, match="the model failed while running this request"):
        engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result()
    monkeypatch.setattr(runner, "forward", real_step)
    assert engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result().generated_token_count == 5
    # A success in between resets the count: one more failure is still not the model's fault.
    monkeypatch.setattr(runner, "forward", lambda work: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(ModelFailure):
        engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result()
    monkeypatch.setattr(runner, "forward", real_step)
    assert engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result().generated_token_count == 5
    assert engine.alive


def test_steps_that_keep_failing_end_the_engine_after_the_configured_count(tiny_loaded, monkeypatch) -> None:
    """A sticky fault of the model (a CUDA error that every step hits) turns health off after N failed steps."""
    failures: list[BaseException] = []
    died = threading.Event()
    config = EngineConfig(kv_cache_memory="64MB", max_consecutive_failed_steps=3)
    engine = Engine(tiny_loaded, config, on_failure=lambda error: (failures.append(error), died.set()))
    engine.start()
    calls: list[int] = []

    def sticky_fault(work: object) -> None:
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.executor, "forward", sticky_fault)
    for _ in range(2):
        with pytest.raises(ModelFailure):
            engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result()
    assert engine.alive and not failures
    with pytest.raises(Unavailable, match="engine stopped"):  # the third: health is off before the client hears
        engine.submit(GenerationRequest(prompt="x", stopping=exact(5))).result()
    assert died.is_set()
    with pytest.raises(Unavailable):
        engine.submit(GenerationRequest(prompt="x"))
    assert len(calls) == 3 and not engine.alive and "illegal memory access" in str(failures[0])
    engine.stop()


def test_a_dead_engine_fails_everything_and_says_so(tiny_loaded, monkeypatch) -> None:
    failures: list[BaseException] = []
    engine = Engine(tiny_loaded, EngineConfig(kv_cache_memory="64MB"), on_failure=failures.append)
    engine.start()
    entered = threading.Event()

    def broken_admit() -> None:
        entered.set()
        raise SystemExit("the interpreter is exiting")

    monkeypatch.setattr(engine, "_admit", broken_admit)
    with engine._cond:
        engine._cond.notify_all()
    stream = engine.submit(GenerationRequest(prompt="x", stopping=exact(5)))
    with pytest.raises(Unavailable, match="engine stopped"):
        stream.result()
    assert entered.is_set() and not engine.alive and isinstance(failures[0], SystemExit)
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


def test_long_prompts_are_prefilled_in_chunks(make_engine, reference, monkeypatch) -> None:
    """Prompts longer than max_prefill_tokens join in pieces while another request decodes; outputs stay exact."""
    engine = make_engine(max_prefill_tokens=16)
    long_prompt = " ".join(f"word{i}" for i in range(60))
    runner_calls: list[int] = []
    step = engine.executor.forward

    def counting_step(work):
        runner_calls.append(sum(len(w.tokens) for w in work if len(w.tokens) > 1))
        return step(work)

    engine.executor.forward = counting_step
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the long prompt comes while the other request decodes (one token taken)
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
    graphs = DecodeGraphs(engine.executor.runner, max_batch_size=6, capture=False)
    used: list[int] = []
    graph_step = graphs.step

    def counting(work):
        logits = graph_step(work)
        used.append(logits is not None)
        return logits

    graphs.step = counting
    engine.executor._graphs = graphs
    cases = [("", PROMPTS[0]), ("alpha", PROMPTS[1]), ("beta", PROMPTS[2]), ("", PROMPTS[4]), ("alpha", PROMPTS[3])]
    streams = [
        engine.submit(with_ids(prompt=p, adapter_id=a, stopping=exact(10 + i))) for i, (a, p) in enumerate(cases)
    ]
    for i, ((adapter, prompt), stream) in enumerate(zip(cases, streams, strict=True)):
        assert [t.id for t in stream.result().tokens] == reference(engine.tokenization.encode(prompt), 10 + i, adapter)
    assert sum(used) > 5, "most decode steps went through the fixed-shape path"


def test_nan_scores_in_one_row_fail_that_request_and_the_batch_goes_on(make_engine, monkeypatch) -> None:
    """A row whose logits are NaN (an adapter gone wrong, a float16 overflow) fails its own request only."""
    engine = make_engine()
    real_step = engine.executor.forward

    def poisoned_step(work: list) -> torch.Tensor:
        logits = real_step(work).clone()
        poison = engine._by_id.get("poison")
        wanting = [w for w in work if w.wants_logits]
        for i, row_work in enumerate(wanting):
            if poison is not None and list(row_work.blocks) == list(poison.table.blocks):
                logits[i] = float("nan")
        return logits

    monkeypatch.setattr(engine.executor, "forward", poisoned_step)
    healthy = [engine.submit(GenerationRequest(prompt=p, stopping=exact(12))) for p in PROMPTS[:2]]
    poisoned = engine.submit(GenerationRequest(prompt=PROMPTS[2], stopping=exact(12), request_id="poison"))
    with pytest.raises(ModelFailure, match="NaN or infinite"):
        poisoned.result()
    assert [s.result().generated_token_count for s in healthy] == [12, 12]
    assert engine.alive and engine.wait_idle(HANG_GUARD_S) and engine.stats().kv_cache_used_blocks == 0


def test_a_load_whose_banks_cannot_be_built_fails_alone_and_the_resident_adapters_serve_on(
    make_engine, adapter_dirs, tmp_path, monkeypatch
) -> None:
    """Building the LoRA banks runs on the engine thread: an error there (out of device memory, say) is the load's
    status, never the engine's end."""
    import loraserve.server.models.executor as executor_module

    engine = make_engine()
    real_banks = executor_module.LoraBanks

    def banks(adapters, *args):  # type: ignore[no-untyped-def]
        if any(a.info.id == "huge" for a in adapters):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_banks(adapters, *args)

    monkeypatch.setattr(executor_module, "LoraBanks", banks)
    before = engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter_id="alpha", stopping=exact(6))).result()
    with pytest.raises(QueueFull, match="does not fit in the device's memory"):
        engine.load_adapter(AdapterSpec("huge", str(adapter_dirs["beta"])), tmp_path, None, None)
    assert engine.alive and "huge" not in [a.id for a in engine.adapters.infos()]
    after = engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter_id="alpha", stopping=exact(6))).result()
    assert after.text == before.text
    outcome = engine.load_adapter(AdapterSpec("gamma", str(adapter_dirs["beta"])), tmp_path, None, None)
    assert outcome.info.id == "gamma"
    assert engine.submit(GenerationRequest(prompt="x", adapter_id="gamma", stopping=exact(3))).result().text


def test_an_adapter_in_a_prompt_format_the_tokenizer_cannot_render_is_refused_at_load(
    make_engine, adapter_dirs, tmp_path, monkeypatch
) -> None:
    engine = make_engine()
    folder = tmp_path / "templated"
    shutil.copytree(adapter_dirs["alpha"], folder)
    (folder / "loraserve.json").write_text(json.dumps({"prompt_format": "chat-template"}))
    monkeypatch.setattr(engine.loaded.tokenizer, "chat_template", None)
    with pytest.raises(InvalidRequest, match="chat template"):
        engine.load_adapter(AdapterSpec("templated", str(folder)), tmp_path, None, None)
    assert engine.alive
    assert engine.submit(GenerationRequest(prompt="x", adapter_id="alpha", stopping=exact(3))).result().text


def test_rag_prompts_and_refused_conversations_on_a_template_without_a_system_role(make_engine, monkeypatch) -> None:
    """RagQuery always sends a system message; Mistral-Instruct v0.1's template raises on one. The system text is
    folded into the user turn, and a conversation the template refuses is INVALID_ARGUMENT, not INTERNAL."""
    from loraserve.prompting import ChatTemplateFormat, Message
    from loraserve.server.retrieval.rag import answer_messages
    from tests.test_prompting import MISTRAL_V01

    engine = make_engine()
    monkeypatch.setattr(engine.loaded.tokenizer, "chat_template", MISTRAL_V01)
    monkeypatch.setattr(engine.tokenization, "prompt_format", ChatTemplateFormat(engine.loaded.tokenizer))
    rag = GenerationRequest(messages=answer_messages("Why is the sky blue?", []), stopping=exact(3))
    assert engine.submit(rag).result().generated_token_count == 3
    with pytest.raises(InvalidRequest, match="must alternate"):
        engine.submit(GenerationRequest(messages=(Message("user", "a"), Message("user", "b"))))
    assert engine.alive


def test_inputs_over_the_size_limit_are_refused_before_anything_tokenizes_them(make_engine, monkeypatch) -> None:
    engine = make_engine(max_input_chars=5000)
    tokenizer = engine.tokenization.tokenizer

    def never(*args: object, **kwargs: object) -> list[int]:
        raise AssertionError("tokenized an input over the limit")

    monkeypatch.setattr(tokenizer, "encode", never)
    huge = "x" * 12_000_000
    with pytest.raises(InvalidRequest, match=r"prompt: is 12000000 characters; at most 5000"):
        engine.submit(GenerationRequest(prompt=huge))
    with pytest.raises(InvalidRequest, match=r"messages: is 5001 characters"):
        engine.submit(GenerationRequest(messages=(Message("system", "y" * 2500), Message("user", "z" * 2501))))
    with pytest.raises(InvalidRequest, match=r"text: is 12000000 characters"):
        engine.tokenize(huge)
    # Many small messages: their contents fit, what the chat template makes of them does not.
    chatty = tuple(Message("user" if i % 2 == 0 else "assistant", "a") for i in range(200))
    with pytest.raises(InvalidRequest, match=r"messages: is \d+ characters once rendered with the prompt format"):
        engine.submit(GenerationRequest(messages=chatty))
    # More messages than the context has tokens (256 here) never fit: refused before they are even rendered.
    endless = tuple(Message("user" if i % 2 == 0 else "assistant", "a") for i in range(300))
    with pytest.raises(InvalidRequest, match=r"messages: has 300 messages; at most 256"):
        engine.submit(GenerationRequest(messages=endless))
    assert engine.alive


def test_the_default_input_limit_follows_the_context(make_engine) -> None:
    engine = make_engine()
    assert engine.max_input_chars == 32 * engine.max_sequence_length


def test_streams_decode_while_a_long_encode_holds_the_request_tokenizer(make_engine) -> None:
    """The engine thread decodes with a tokenizer of its own: an encode on an RPC thread (its lock held here for as
    long as the test likes) cannot hold up running streams."""
    engine = make_engine()
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], stopping=exact(20)))
    with engine.tokenization._lock:
        assert stream.result().generated_token_count == 20


def test_a_load_whose_deadline_passed_while_it_was_read_loads_nothing(make_engine, adapter_dirs, tmp_path) -> None:
    """The deadline covers the read (an S3 download, say) and the wait for the engine together: past it after the
    read, nothing is queued, so no adapter turns up after the client was told DEADLINE_EXCEEDED."""
    from loraserve.errors import DeadlineExceeded

    engine = make_engine()
    with pytest.raises(DeadlineExceeded, match="nothing was loaded"):
        engine.load_adapter(AdapterSpec("late", str(adapter_dirs["beta"])), tmp_path, None, time.monotonic() - 1)
    assert "late" not in [a.id for a in engine.adapters.infos()] and not engine.adapters.has_pending()
