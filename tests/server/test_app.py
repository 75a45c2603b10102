"""The gRPC server end to end, through the real client on 127.0.0.1: every RPC, every error status, health
transitions, cancellation, deadlines, and the request id."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import replace

import grpc
import pytest

from loraserve.client import Client, LoraserveRpcError, StopReason
from loraserve.server.retrieval.rag import NO_RELEVANT_DOCUMENTS
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import HANG_GUARD_S, EngineGate, wait_for

USER = [{"role": "user", "content": "What is the capital of France?"}]


def wait_until_idle(client: Client) -> dict[str, float]:
    """ModelInfo's stats once no request is active or queued: polled until then, bounded only by the hang guard."""
    stats: dict[str, float] = {}

    def idle() -> bool:
        nonlocal stats
        stats = client.model_info().stats
        return stats["active_requests"] == 0 and stats["queued_requests"] == 0

    wait_for(idle, "the server to have no request active or queued")
    return stats


def test_generate_and_stream_agree_exactly(tiny_server) -> None:
    client = tiny_server.client
    unary = client.generate(messages=USER, max_new_tokens=40, min_new_tokens=40)
    chunks = list(client.stream(messages=USER, max_new_tokens=40, min_new_tokens=40))
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].stop_reason is StopReason.MAX_TOKENS and all(c.stop_reason is None for c in chunks[:-1])
    assert chunks[-1].generated_token_count == unary.generated_token_count == 40
    assert chunks[0].input_token_count == unary.input_token_count == client.tokenize(messages=USER).token_count


def test_a_shared_prefix_is_reported_as_cached_tokens_and_in_the_stats(tiny_server) -> None:
    client = tiny_server.client
    system = {"role": "system", "content": "You answer questions about geography, briefly and exactly. " * 6}
    first = client.generate(messages=[system, *USER], max_new_tokens=3)
    again = [{"role": "user", "content": "And of Italy?"}]
    unary = client.generate(messages=[system, *again], max_new_tokens=3)
    chunks = list(client.stream(messages=[system, *again], max_new_tokens=3))
    assert first.cached_input_token_count < unary.cached_input_token_count
    assert unary.cached_input_token_count >= 48 and unary.cached_input_token_count < unary.input_token_count
    assert all(c.cached_input_token_count >= unary.cached_input_token_count for c in chunks)
    stats = wait_until_idle(client)
    assert stats["prefix_caching"] and stats["prefix_cache_hit_tokens"] > 0 and stats["prefix_cache_hit_rate"] > 0
    assert stats["kv_cache_used_blocks"] == 0 and stats["kv_cache_blocks"] > 0 and stats["kv_cache_block_size"] == 16


def test_request_id_is_sent_as_metadata_and_in_the_response(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(prompt="Hello", stopping=pb.StoppingCriteria(max_new_tokens=2))
        response, call = stub.Generate.with_call(request, timeout=HANG_GUARD_S)
    metadata = dict(call.initial_metadata())
    assert len(response.request_id) == 32 and metadata["x-request-id"] == response.request_id


def test_correlation_id_is_logged_with_the_request_id(tiny_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loraserve")
    result = tiny_server.client.generate("Hello", max_new_tokens=2, metadata=[("x-correlation-id", "trace-42")])
    received = [r for r in caplog.records if r.getMessage() == "request received" and r.request_id == result.request_id]
    assert received and received[0].correlation_id == "trace-42"
    finished = [r for r in caplog.records if r.getMessage() == "request finished" and r.request_id == result.request_id]
    assert finished and finished[0].generated_tokens == result.generated_token_count


def test_adapters_are_chosen_per_request(tiny_server) -> None:
    client = tiny_server.client
    texts = {
        a: client.generate("Once upon a time", adapter_id=a, max_new_tokens=12, min_new_tokens=12, token_ids=True)
        for a in ("", "alpha", "beta")
    }
    assert len({tuple(t.id for t in g.tokens) for g in texts.values()}) == 3


@pytest.mark.parametrize(
    ("kwargs", "code", "fragment"),
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty"),
        (dict(prompt="hi", messages=USER), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (
            dict(messages=[{"role": "wizard", "content": "hi"}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role: unknown role 'wizard'",
        ),
        (dict(prompt="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (dict(prompt="hi", temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (dict(prompt="hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1]"),
        (dict(prompt="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        (dict(prompt="hi", top_k=-3), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
        (
            dict(prompt="hi", max_new_tokens=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stopping.max_new_tokens: must be >= 1",
        ),
        (dict(prompt="hi", max_new_tokens=65), grpc.StatusCode.INVALID_ARGUMENT, "must be <= 64"),
        (dict(prompt="hi", stop_sequences=[str(i) for i in range(9)]), grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
        (
            dict(prompt="hi", stop_sequences=["ok", ""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stopping.stop_sequences[1]: must not be empty",
        ),
        (dict(prompt="hi", top_n=21), grpc.StatusCode.INVALID_ARGUMENT, "response.top_n: must be <= 20"),
        (dict(prompt="word " * 300), grpc.StatusCode.INVALID_ARGUMENT, "set truncate_input_tokens"),
        (dict(prompt="hi", adapter_id="gamma"), grpc.StatusCode.NOT_FOUND, "no adapter 'gamma' is loaded"),
        (dict(prompt="hi", adapter_id="../../etc"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid adapter id"),
    ],
)
@pytest.mark.parametrize("rpc", ["generate", "stream"])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(tiny_server, rpc, kwargs, code, fragment) -> None:
    client = tiny_server.client
    kwargs = dict(kwargs)  # parametrized values are shared between runs
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(LoraserveRpcError) as error:
        result = getattr(client, rpc)(prompt, **kwargs)
        if rpc == "stream":
            list(result)
    assert error.value.code == code
    assert fragment in error.value.details
    assert "Traceback" not in error.value.details
    assert client.health() == "SERVING"
    assert client.generate("hi", max_new_tokens=1).generated_token_count == 1


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.rag_query(" ", [{"id": "a", "text": "t"}]), "query: must not be empty"),
        (lambda c: c.rag_query("q", []), "documents: give documents, a collection, or both"),
        (lambda c: c.rag_query("q", [{"id": "a", "text": "t"}], top_k=0), "top_k: must be in [1, 20]"),
        (lambda c: c.rag_query("q", [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]), "documents[1].id"),
        (lambda c: c.rag_query("q", [{"id": str(i), "text": "t"} for i in range(101)]), "at most 100 documents"),
        (lambda c: c.tokenize(), "text: must not be empty"),
    ],
)
def test_bad_rag_and_tokenize_input_is_invalid_argument(tiny_server, call, fragment) -> None:
    with pytest.raises(LoraserveRpcError) as error:
        call(tiny_server.client)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details


def test_model_info_describes_model_adapters_limits_and_stats(tiny_server) -> None:
    client = tiny_server.client
    client.generate("Hello", max_new_tokens=3, min_new_tokens=3)
    info = client.model_info()
    assert info.architecture == "LlamaForCausalLM" and info.device == "cpu" and info.dtype == "float32"
    assert info.max_sequence_length == 256 and info.vocab_size == 49152 and info.quantization == "none"
    assert {(a.id, a.rank, a.alpha) for a in info.adapters} == {("alpha", 4, 16.0), ("beta", 8, 16.0)}
    assert all(a.target_modules == ("q_proj", "v_proj") for a in info.adapters)
    assert info.limits["max_new_tokens"] == 64 and info.limits["max_batch_size"] == 8
    assert info.stats["generated_tokens"] >= 3 and info.stats["uptime_seconds"] > 0
    assert info.prompt_format == "chat-template" and info.server_version


def test_tokenize_returns_tokens_on_request(tiny_server) -> None:
    result = tiny_server.client.tokenize("Hello world", return_tokens=True)
    assert result.token_count == len(result.tokens) == 2
    assert "".join(t.text for t in result.tokens) == "Hello world"
    assert tiny_server.client.tokenize("Hello world").tokens == ()


def test_rag_query_cites_matching_documents_and_admits_ignorance(tiny_server) -> None:
    documents = [
        {"id": "fr", "text": "Paris is the capital of France.", "title": "France", "metadata": {"lang": "en"}},
        {"id": "ba", "text": "Bananas are yellow.", "title": "Bananas"},
    ]
    answer = tiny_server.client.rag_query("What is the capital of France?", documents, max_new_tokens=8)
    assert [s.document_id for s in answer.sources] == ["fr"]
    assert answer.sources[0].metadata == {"lang": "en"} and answer.sources[0].rank == 1
    assert answer.generated_token_count > 0 and answer.input_token_count > 0
    none = tiny_server.client.rag_query("quantum chromodynamics", documents)
    assert none.text == NO_RELEVANT_DOCUMENTS and none.sources == () and none.generated_token_count == 0


def slow_down(running, monkeypatch, seconds_per_step: float = 0.01) -> None:
    """Make every decode step of the server's engine take a while, so timing-dependent tests are deterministic."""
    runner = running.server.engine.executor
    step = runner.forward

    def slow_step(work):
        time.sleep(seconds_per_step)
        return step(work)

    monkeypatch.setattr(runner, "forward", slow_step)


def test_deadline_exceeded_frees_the_request(start_server, monkeypatch) -> None:
    running = start_server()
    slow_down(running, monkeypatch, seconds_per_step=0.05)  # 200 tokens take > 10 s; the deadline is 0.3 s
    try:
        result = running.client.generate("Once", max_new_tokens=200, min_new_tokens=200, timeout=0.3)
    except LoraserveRpcError as error:
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        pytest.fail(f"the request finished within its deadline: {result}")
    assert wait_until_idle(running.client)["active_requests"] == 0


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "RagQuery"])
def test_a_request_the_engine_drops_at_its_deadline_ends_deadline_exceeded(start_server, monkeypatch, rpc) -> None:
    """The engine drops a request when its own clock passes the deadline, which can come before gRPC's timer fires on
    the client. Made deterministic here: the server sees a 0.3 s deadline, the client's own is only a hang guard. The
    client must get DEADLINE_EXCEEDED, never a partial result with status OK."""
    from loraserve.server import servicer

    monkeypatch.setattr(servicer, "deadline_of", lambda context: time.monotonic() + 0.3)
    running = start_server()
    slow_down(running, monkeypatch, seconds_per_step=0.05)
    long = {"max_new_tokens": 200, "min_new_tokens": 200, "timeout": HANG_GUARD_S}
    with pytest.raises(LoraserveRpcError) as raised:
        if rpc == "GenerateStream":
            for _ in running.client.stream("Once", **long):
                pass
        elif rpc == "Generate":
            running.client.generate("Once", **long)
        else:
            documents = [{"id": "sky", "text": "The sky is blue because air scatters blue light most."}]
            running.client.rag_query("Why is the sky blue?", documents, min_similarity=-1, **long)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed" in str(raised.value)
    assert wait_until_idle(running.client)["active_requests"] == 0


def test_client_cancellation_frees_the_request(start_server, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="loraserve")
    running = start_server()
    with EngineGate(running.server.engine, monkeypatch) as gate:
        gate.hold_after_tokens(1, until_cancelled=True)  # it cannot finish before the cancel, however slow the machine
        stream = running.client.stream("Tell me a long story", max_new_tokens=200, min_new_tokens=200)
        request_id = next(stream).request_id
        stream.close()  # leaving early cancels the call on the server
        assert wait_until_idle(running.client)["active_requests"] == 0
    finished = [r for r in caplog.records if r.getMessage() == "request finished" and r.request_id == request_id]
    assert finished[0].stop_reason == "cancelled" and finished[0].generated_tokens < 200


def test_full_queue_is_resource_exhausted_and_admitted_requests_finish(start_server, monkeypatch) -> None:
    running = start_server(max_batch_size=1, max_queued_requests=0)
    with EngineGate(running.server.engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the admitted request is still running when the next one comes
        stream = running.client.stream("Once", max_new_tokens=30, min_new_tokens=30)
        first = next(stream)
        with pytest.raises(LoraserveRpcError) as error:
            running.client.generate("Another", max_new_tokens=2)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in error.value.details
        gate.release()
        rest = list(stream)
    assert rest[-1].generated_token_count == 30 and first.generated_token_count == 1


def test_health_follows_loading_and_draining(start_server, monkeypatch) -> None:
    running = start_server(load=False)
    client = running.client
    assert client.health() == "NOT_SERVING"
    assert client.health("loraserve.v1.InferenceService") == "NOT_SERVING"
    with pytest.raises(LoraserveRpcError) as unknown:
        client.health("no.such.Service")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(LoraserveRpcError) as error:
        client.generate("hi")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details
    running.server.load()
    assert client.health() == "SERVING" and client.health("loraserve.v1.InferenceService") == "SERVING"
    with EngineGate(running.server.engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the stream is still in flight when the drain starts
        stream = client.stream("Once", max_new_tokens=20, min_new_tokens=20)
        next(stream)
        running.server.drain()
        assert client.health() == "NOT_SERVING"
        with pytest.raises(LoraserveRpcError) as error:
            client.generate("hi")
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.value.details
        gate.release()
        assert list(stream)[-1].generated_token_count == 20, "in-flight requests finish while draining"
    assert running.server.wait_idle(HANG_GUARD_S), f"hang guard: still busy after {HANG_GUARD_S:.0f} s"


def test_unexpected_errors_are_internal_with_the_request_id(start_server, monkeypatch) -> None:
    running = start_server()

    def broken_submit(request):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(running.server.engine, "submit", broken_submit)
    with pytest.raises(LoraserveRpcError) as error:
        running.client.generate("hi")
    assert error.value.code == grpc.StatusCode.INTERNAL
    assert error.value.request_id and error.value.request_id in error.value.details
    assert "secret" not in error.value.details and "ZeroDivision" not in error.value.details
    assert running.client.health() == "SERVING"


def test_a_dead_engine_turns_health_not_serving(start_server, monkeypatch) -> None:
    """Steps that keep failing (here from the first: --max-consecutive-failed-steps 1) are the model's fault: the
    engine stops, health says so before the client hears UNAVAILABLE."""
    running = start_server(max_consecutive_failed_steps=1)
    engine = running.server.engine

    def broken_step(work):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(engine.executor, "forward", broken_step)
    with pytest.raises(LoraserveRpcError) as error:
        running.client.generate("hi", max_new_tokens=50, min_new_tokens=50)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert running.client.health() == "NOT_SERVING"


def test_adapter_calls_without_a_client_deadline_wait_for_the_engine(
    start_server, tiny_model_config, adapter_dirs, tmp_path
) -> None:
    """grpcurl and plain stubs send no deadline: grpc then reports ~9e18 s remaining, which must mean "none", not
    an overflow (INTERNAL) after the adapter was loaded anyway."""
    root = tmp_path / "adapters"
    shutil.copytree(adapter_dirs["beta"], root / "beta")
    running = start_server(model_config=replace(tiny_model_config, adapter_root=str(root)), kv_cache_memory="64MB")
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.AdapterServiceStub(channel)
        loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="gamma", source="beta"))  # no timeout
        assert loaded.adapter.id == "gamma"
        assert stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id="gamma")).adapter_id == "gamma"
    assert running.server._serving
