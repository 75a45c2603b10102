"""Clients that hold calls open: streams nobody reads, and more calls than the server serves at once. Their output
waits coalesced into one chunk, a stream whose client stops reading is cancelled after --client-stall-timeout, and
health checks, Ready and reflection always find a thread, whatever the other calls hold."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import grpc
import pytest

from loraserve.client import LoraserveRpcError
from loraserve.config import ServerConfig
from loraserve.server.engine.outputs import GenerationChunk, StopReason
from loraserve.server.engine.request_stream import RequestStream
from loraserve.server.http_api.app import HttpApi
from loraserve.server.interceptors import AccessInterceptor
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import HANG_GUARD_S, wait_for
from tests.server.test_http_frame import post_scope


def chunk(text: str, count: int, stop: StopReason | None = None) -> GenerationChunk:
    return GenerationChunk("r", text, input_token_count=3, generated_token_count=count, stop_reason=stop)


def test_what_the_reader_has_not_taken_is_one_chunk() -> None:
    stream = RequestStream("r", cancel=lambda _: None, engine_alive=lambda: True)
    for i in range(1000):
        stream.put(chunk(f"{i} ", i + 1))
    stream.put(chunk("end", 1001, StopReason.MAX_TOKENS))
    assert len(stream._backlog) == 1
    merged = stream.take_nowait()
    assert merged is not None and isinstance(merged, GenerationChunk)
    assert merged.text == "".join(f"{i} " for i in range(1000)) + "end"
    assert merged.generated_token_count == 1001 and merged.stop_reason is StopReason.MAX_TOKENS


def test_an_error_after_unread_chunks_still_arrives_after_them() -> None:
    stream = RequestStream("r", cancel=lambda _: None, engine_alive=lambda: True)
    stream.put(chunk("a", 1))
    stream.put(chunk("b", 2))
    stream.put(RuntimeError("the model failed"))
    reader = iter(stream)
    assert next(reader).text == "ab"
    with pytest.raises(RuntimeError, match="the model failed"):
        next(reader)


def gate_steps(running, monkeypatch) -> threading.Event:  # type: ignore[no-untyped-def]
    """Every engine step waits for the returned event: the test decides when the batch moves on."""
    runner = running.server.engine.executor
    step, gate = runner.forward, threading.Event()

    def gated(work):  # type: ignore[no-untyped-def]
        gate.wait(HANG_GUARD_S)
        return step(work)

    monkeypatch.setattr(runner, "forward", gated)
    return gate


def test_health_and_ready_find_a_thread_when_calls_fill_the_limit(start_server, monkeypatch) -> None:
    running = start_server(server_options={"grpc_workers": 2})
    gate = gate_steps(running, monkeypatch)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        held = [
            stub.GenerateStream(pb.GenerateStreamRequest(prompt="Once", stopping={"max_new_tokens": 4}))
            for _ in range(2)
        ]
        stats = running.server.engine.stats
        wait_for(lambda: stats().active_requests + stats().queued_requests == 2, "both streams to be submitted")
        assert running.client.health() == "SERVING"
        running.client.ready()
        with pytest.raises(LoraserveRpcError) as refused:
            running.client.generate("one more", max_new_tokens=2)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--grpc-workers" in refused.value.details
        gate.set()
        for call in held:
            assert list(call)[-1].stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert running.client.generate("now there is room", max_new_tokens=2).text is not None


def test_a_stream_whose_client_stops_reading_is_cancelled_and_gives_back_its_thread(start_server) -> None:
    """Large messages (every token with 20 alternatives, the prompt's tokens in the first) fill the HTTP/2 window
    within a few tokens; the client never reads. After --client-stall-timeout the server cancels the call."""
    running = start_server(server_options={"client_stall_timeout": 1.0}, max_top_n=20)
    # The client's receive window stays at its initial 64 KiB (no BDP probing to grow it); the output is ~140 KiB.
    options = [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(running.target, options=options) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GenerateStreamRequest(
            prompt="word " * 40,
            stopping={"max_new_tokens": 200, "min_new_tokens": 200},
            response={"top_n": 20, "logprobs": True, "token_ids": True, "input_tokens": True},
        )
        unread = stub.GenerateStream(request)  # never iterated until the server gave up on it
        guard = running.server.stall_guard
        wait_for(lambda: guard.cancelled == 1, "the server to cancel the stream nobody reads")
        # Its output waited coalesced while the engine went on; what the cancel frees is the call's thread and slot.
        wait_for(lambda: running.server.concurrency.calls.active == 0, "the stream's call to end on the server")
        wait_for(lambda: running.server.engine.stats().active_requests == 0, "the engine to be idle")
        with pytest.raises(grpc.RpcError) as ended:
            for _ in unread:
                pass
        assert ended.value.code() == grpc.StatusCode.CANCELLED
    assert running.client.health() == "SERVING"
    assert running.client.generate("still serving", max_new_tokens=2).text is not None


def test_an_http_stream_whose_client_stops_reading_is_cancelled(start_server, monkeypatch, caplog) -> None:
    """The same over the HTTP API, at the ASGI level (kernel socket buffers would hide a small stall): the client
    takes the response's start and its first event, then nothing. After --client-stall-timeout the app gives up,
    the engine drops the rows, and the response is left unfinished (the HTTP server closes the connection)."""
    caplog.set_level(logging.INFO, logger="loraserve")
    running = start_server()
    engine = running.server.engine
    step = engine.executor.forward
    # 200 steps of at least 50 ms: the rows can only end early by being cancelled (a slower machine is slower still)
    monkeypatch.setattr(engine.executor, "forward", lambda work: (time.sleep(0.05), step(work))[1])
    api = HttpApi(lambda: engine, lambda: True, AccessInterceptor(ServerConfig()), None, 1 << 20, 0.5)
    app = api.build()
    body = json.dumps(
        {
            "model": engine.loaded.description.name,
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 200,
            "min_tokens": 200,
            "n": 2,
            "stream": True,
        }
    ).encode()
    scope = post_scope("/v1/chat/completions", [(b"content-length", str(len(body)).encode())])
    taken: list[dict] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # connected, silent
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        if len(taken) >= 2:  # the start and one event; then the client stops reading
            await asyncio.Event().wait()
        taken.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), HANG_GUARD_S))
    assert taken[0]["status"] == 200 and taken[1]["body"].startswith(b"data: ")
    wait_for(lambda: engine.stats().active_requests == 0, "the engine to drop the rows")
    finished = [r.stop_reason for r in caplog.records if r.getMessage() == "request finished"]
    assert finished == ["cancelled", "cancelled"]
    assert engine.stats().kv_cache_used_blocks == 0 and running.client.health() == "SERVING"


def test_probe_streams_held_open_leave_health_checks_a_thread(start_server) -> None:
    """Health Watch and reflection streams need no token and can stay open for ever: at most PROBE_STREAMS of them
    run at once, and the spare threads they leave serve Check and Ready, however many the client opens."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from loraserve.server.concurrency import PROBE_STREAMS

    running = start_server(server_options={"grpc_workers": 2})
    silent = threading.Event()  # a reflection client that never sends its request

    def never_asks():  # type: ignore[no-untyped-def]
        silent.wait(HANG_GUARD_S)
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    with grpc.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        held = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(PROBE_STREAMS)]
        for watch in held:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # admitted, and held open
        over = [reflection.ServerReflectionInfo(never_asks()) for _ in range(PROBE_STREAMS)]
        wait_for(lambda: all(call.done() for call in over), "the streams over the limit to be refused")
        assert {call.code() for call in over} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for _ in range(3 * 16):  # more checks than there are spare threads: each finds one
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=HANG_GUARD_S).status == 1
        running.client.ready()
        silent.set()
        for call in held:
            call.cancel()
    # Reflection streams that never send hold their threads too; the same limit holds them.
    wait_for(lambda: running.server.concurrency.probe_streams.active == 0, "the cancelled Watch streams to end")
    with grpc.insecure_channel(running.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        silent.clear()
        quiet = [reflection.ServerReflectionInfo(never_asks()) for _ in range(PROBE_STREAMS)]
        wait_for(lambda: running.server.concurrency.probe_streams.active == PROBE_STREAMS, "the streams to be held")
        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HANG_GUARD_S).status == 1
        )
        silent.set()
        for call in quiet:
            call.cancel()
