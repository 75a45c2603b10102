"""The OpenAI-compatible HTTP API on the tiny model: the real `openai` SDK (chat, completions, streaming, adapters by
`model`, structured output, logprobs, errors as the SDK's exceptions), raw HTTP for SSE framing and error bodies,
bearer tokens, a client that goes away mid-stream, draining, gRPC and HTTP requests sharing one batch, chunked bodies
counted as they arrive, and a stream that fails mid-way."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from loraserve.errors import Unavailable
from tests.conftest import HANG_GUARD_S, EngineGate, wait_for


@pytest.fixture(scope="module")
def served(tiny_http_server) -> str:
    """The served model's id, as /v1/models names it."""
    return tiny_http_server.server.engine.loaded.description.name


@pytest.fixture(scope="module")
def sdk(tiny_http_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{tiny_http_server.server.http_port}/v1", api_key="unused", max_retries=0
    )


@pytest.fixture(scope="module")
def base_url(tiny_http_server) -> str:
    return f"http://127.0.0.1:{tiny_http_server.server.http_port}"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_lists_the_served_model_and_every_adapter(sdk, served) -> None:
    models = {m.id: m for m in sdk.models.list().data}
    assert set(models) == {served, "alpha", "beta"}
    assert models["alpha"].model_extra["parent"] == served


def test_a_chat_completion_equals_the_same_request_over_grpc(sdk, tiny_http_server, served) -> None:
    expected = tiny_http_server.client.generate(messages=ask("Hello"), max_new_tokens=8, min_new_tokens=8)
    response = sdk.chat.completions.create(
        model=served, messages=ask("Hello"), max_tokens=8, temperature=0, extra_body={"min_tokens": 8}
    )
    choice = response.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == expected.input_token_count and response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert response.id.startswith("chatcmpl-") and response.model == served


def test_an_adapter_is_picked_by_model(sdk, tiny_http_server) -> None:
    expected = tiny_http_server.client.generate("Once upon", adapter_id="beta", max_new_tokens=6, min_new_tokens=6)
    base = tiny_http_server.client.generate("Once upon", max_new_tokens=6, min_new_tokens=6)
    response = sdk.completions.create(
        model="beta", prompt="Once upon", max_tokens=6, temperature=0, extra_body={"min_tokens": 6}
    )
    assert response.choices[0].text == expected.text != base.text


def test_streamed_chat_adds_up_to_the_whole_answer_and_reports_usage(sdk, served) -> None:
    whole = sdk.chat.completions.create(model=served, messages=ask("Tell me"), max_tokens=12, temperature=0)
    stream = sdk.chat.completions.create(
        model=served,
        messages=ask("Tell me"),
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_n_seeds_several_prompts_and_logprobs(sdk, served, tokenizer) -> None:
    response = sdk.completions.create(
        model=served, prompt=["The sky", "A cat"], n=2, max_tokens=5, seed=11, logprobs=2, extra_body={"min_tokens": 5}
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    again = sdk.completions.create(
        model=served, prompt=["The sky", "A cat"], n=2, max_tokens=5, seed=11, logprobs=2, extra_body={"min_tokens": 5}
    )
    assert [c.text for c in response.choices] == [c.text for c in again.choices]  # seeded: repeatable
    logprobs = response.choices[0].logprobs
    assert "".join(logprobs.tokens) == response.choices[0].text and len(logprobs.token_logprobs) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0
    prompt_tokens = sum(len(tokenizer.encode(t)) for t in ("The sky", "A cat"))
    assert response.usage.prompt_tokens == prompt_tokens  # each prompt counted once, not once per choice
    assert response.usage.completion_tokens == 20


def test_chat_logprobs_come_per_token(sdk, served) -> None:
    response = sdk.chat.completions.create(
        model=served, messages=ask("Hi"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert "".join(t.token for t in content) == response.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_response_format_constrains_the_answer(sdk, served) -> None:
    schema = {
        "type": "object",
        "properties": {"size": {"enum": ["small", "large"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["size", "count"],
        "additionalProperties": False,
    }
    response = sdk.chat.completions.create(
        model=served,
        messages=ask("Describe it"),
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
    )
    value = json.loads(response.choices[0].message.content)
    assert value["size"] in ("small", "large") and 0 <= value["count"] <= 9
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("call", "exception", "fragment"),
    [
        (lambda s, m: s.chat.completions.create(model="gamma", messages=ask("hi")), openai.NotFoundError, "gamma"),
        (lambda s, m: s.chat.completions.create(model=m, messages=[]), openai.BadRequestError, "messages"),
        (
            lambda s, m: s.chat.completions.create(model=m, messages=ask("hi"), temperature=3),
            openai.BadRequestError,
            "temperature",
        ),
        (
            lambda s, m: s.chat.completions.create(model=m, messages=[{"role": "tool", "content": "x"}]),
            openai.BadRequestError,
            "role",
        ),
        (
            lambda s, m: s.completions.create(model=m, prompt="hi", max_tokens=1000),
            openai.BadRequestError,
            "must be <= 64",
        ),
        (
            lambda s, m: s.chat.completions.create(model=m, messages=ask("hi"), presence_penalty=0.5),
            openai.BadRequestError,
            "presence_penalty is not supported",
        ),
        (
            lambda s, m: s.chat.completions.create(
                model=m,
                messages=ask("hi"),
                response_format={"type": "json_schema", "json_schema": {"schema": {"if": {}}}},
            ),
            openai.BadRequestError,
            "Unimplemented keys",
        ),
    ],
)
def test_bad_requests_raise_the_sdk_exception_for_their_status(sdk, served, call, exception, fragment) -> None:
    with pytest.raises(exception) as raised:
        call(sdk, served)
    assert fragment in raised.value.message
    assert raised.value.response.headers["x-request-id"]


def test_sse_frames_and_error_bodies_on_the_wire(base_url, served) -> None:
    with httpx.stream(
        "POST",
        f"{base_url}/v1/completions",
        json={"model": served, "prompt": "Hi", "max_tokens": 3, "min_tokens": 3, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    frames = body.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    events = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[0]["object"] == "text_completion"
    for content, fragment in [
        (b"{not json", "not valid JSON"),
        (json.dumps({"model": served, "messages": ask("hi"), "n": "two"}).encode(), "n:"),
        (json.dumps({"model": served, "messages": ask("hi"), "tools": []}).encode(), "tools: is not a field"),
    ]:
        bad = httpx.post(
            f"{base_url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
        assert error["type"] == "invalid_request_error" and bad.headers["x-request-id"]
    missing = httpx.get(f"{base_url}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{base_url}/health").json() == {"status": "SERVING"}
    assert httpx.get(f"{base_url}/ready").status_code == 200


def test_grpc_and_http_requests_share_one_batch(tiny_http_server, monkeypatch) -> None:
    running = tiny_http_server
    engine = running.server.engine
    served = engine.loaded.description.name
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{running.server.http_port}/v1", api_key="x", max_retries=0)
    with EngineGate(engine, monkeypatch) as gate:
        start = engine.stats()

        def waiting_for_http() -> bool:  # the gRPC request has a token, the HTTP one has not come yet
            stats = engine.stats()
            came = stats.active_requests + stats.queued_requests + stats.completed_requests - start.completed_requests
            return stats.generated_tokens > start.generated_tokens and came < 2

        gate.hold_when(waiting_for_http)  # so the two meet in the batch, however slow the machine
        grpc_stream = running.client.stream("Hello", max_new_tokens=30, min_new_tokens=30)
        next(grpc_stream)  # the gRPC request is decoding
        response = sdk.completions.create(model=served, prompt="Hello", max_tokens=5, extra_body={"min_tokens": 5})
        rest = list(grpc_stream)
    assert response.usage.completion_tokens == 5 and rest[-1].finished
    assert max(gate.batches) == 2  # at least one step ran both


def test_a_client_that_goes_away_mid_stream_frees_its_row(tiny_http_server, monkeypatch) -> None:
    running = tiny_http_server
    engine = running.server.engine
    before = engine.stats().generated_tokens
    served = engine.loaded.description.name
    body = {"model": served, "prompt": "Hi", "max_tokens": 60, "min_tokens": 60, "stream": True}
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_after_tokens(1, until_cancelled=True)  # it cannot reach max_tokens before its client's leaving does
        with httpx.stream("POST", f"http://127.0.0.1:{running.server.http_port}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        wait_for(lambda: engine.stats().active_requests == 0, "the request to leave the batch")
    stats = engine.stats()
    assert stats.active_requests == 0 and stats.kv_cache_used_blocks == 0
    assert stats.generated_tokens - before < 60  # it ended early, not at max_tokens


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(start_server, free_port, monkeypatch) -> None:
    running = start_server(server_options={"http_port": free_port()}, max_batch_size=1, max_queued_requests=0)
    served = running.server.engine.loaded.description.name
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{running.server.http_port}/v1", api_key="x", max_retries=0)
    with EngineGate(running.server.engine, monkeypatch) as gate:
        gate.hold_after_tokens(1)  # the busy request still runs when the next one comes
        busy = running.client.stream("Hello", max_new_tokens=40, min_new_tokens=40)
        next(busy)  # admitted: the batch of one is full and nothing may wait
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.completions.create(model=served, prompt="Hi", max_tokens=2)
        assert raised.value.response.headers["retry-after"] == "1"
        assert "capacity" in raised.value.message
        busy.close()


def test_bearer_tokens_guard_the_api_but_not_health(start_server, free_port, monkeypatch) -> None:
    monkeypatch.setenv("LORASERVE_AUTH_TOKENS", "s3cret")
    running = start_server(server_options={"http_port": free_port()}, client_options={"token": "s3cret"})
    base = f"http://127.0.0.1:{running.server.http_port}"
    served = running.server.engine.loaded.description.name
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret").models.list().data[0].id == served
    assert httpx.get(f"{base}/health").status_code == 200


def test_draining_refuses_new_requests_and_ready_says_so(start_server, free_port) -> None:
    running = start_server(server_options={"http_port": free_port()})
    base = f"http://127.0.0.1:{running.server.http_port}"
    served = running.server.engine.loaded.description.name
    running.server.drain()
    assert httpx.get(f"{base}/ready").status_code == 503
    assert httpx.get(f"{base}/health").status_code == 503
    refused = httpx.post(f"{base}/v1/completions", json={"model": served, "prompt": "hi"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable_error"


def test_the_http_port_is_off_unless_asked_for(tiny_server) -> None:
    assert tiny_server.server.http_port is None and tiny_server.server._http is None


def test_models_follow_adapters_loaded_and_unloaded_at_runtime(
    start_server, free_port, tiny_model_config, adapter_dirs
) -> None:
    config = dataclasses.replace(tiny_model_config, adapter=(), adapter_root=str(adapter_dirs["alpha"].parent))
    running = start_server(model_config=config, server_options={"http_port": free_port()})
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{running.server.http_port}/v1", api_key="x", max_retries=0)
    served = running.server.engine.loaded.description.name
    assert [m.id for m in sdk.models.list().data] == [served]
    running.client.load_adapter("late", adapter_dirs["beta"].name)
    assert [m.id for m in sdk.models.list().data] == [served, "late"]
    late = sdk.completions.create(model="late", prompt="Hi", max_tokens=2, extra_body={"min_tokens": 2})
    assert late.usage.completion_tokens == 2
    running.client.unload_adapter("late")
    assert [m.id for m in sdk.models.list().data] == [served]
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="late", prompt="Hi", max_tokens=2)


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(tiny_http_server, monkeypatch) -> None:
    running = tiny_http_server
    engine = running.server.engine
    before = engine.stats().generated_tokens
    served = engine.loaded.description.name
    body = {"model": served, "prompt": "Hi", "max_tokens": 60, "min_tokens": 60}
    with EngineGate(engine, monkeypatch) as gate:
        gate.hold_after_tokens(1, until_cancelled=True)  # no answer can come before the client leaves
        with pytest.raises(httpx.ReadTimeout):  # the client leaves after 0.5 s
            httpx.post(f"http://127.0.0.1:{running.server.http_port}/v1/completions", json=body, timeout=0.5)
        wait_for(lambda: engine.stats().active_requests == 0, "the request to leave the batch")
    stats = engine.stats()
    assert stats.active_requests == 0 and stats.kv_cache_used_blocks == 0
    assert stats.generated_tokens - before < 60


def test_a_body_over_the_message_limit_is_refused(start_server, free_port) -> None:
    running = start_server(server_options={"http_port": free_port(), "max_message_bytes": 4096})
    served = running.server.engine.loaded.description.name
    url = f"http://127.0.0.1:{running.server.http_port}/v1/completions"
    refused = httpx.post(url, json={"model": served, "prompt": "x" * 5000})
    assert refused.status_code == 413 and "at most 4096" in refused.json()["error"]["message"]
    assert httpx.post(url, json={"model": served, "prompt": "x", "max_tokens": 1}).status_code == 200


def post_chunked(port: int, chunks: Iterator[bytes], timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """POST /v1/completions with a chunked body over a raw socket: one thread writes `chunks` (until the server stops
    taking them), this one reads the answer. The status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        connection.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")

        def write() -> None:
            try:
                for chunk in chunks:
                    connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b"0\r\n\r\n")
            except OSError:  # the server closed the connection: it has stopped reading, as it should
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        received = b""
        try:
            while data := connection.recv(65536):
                received += data
        except ConnectionResetError:  # the server closed with our bytes unread; what it sent first is kept
            pass
        with contextlib.suppress(OSError):  # unblocks the writer, if the server still takes bytes
            connection.shutdown(socket.SHUT_RDWR)
    writer.join(timeout)
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def megabytes(count: int, end: bool) -> Iterator[bytes]:
    """`count` MiB of a body that is not JSON (reading it whole would end in a 400), then its end if `end`."""
    for _ in range(count):
        yield b"x" * (1 << 20)
    if end:
        yield b""


@pytest.mark.parametrize(
    "chunks",
    [lambda: megabytes(64, end=True), lambda: megabytes(256, end=False)],
    ids=["64-MiB", "never-ending"],  # the second has no end: the test's client gives up after 256 MiB
)
def test_a_chunked_body_is_counted_as_it_arrives(tiny_http_server, chunks) -> None:
    status, headers, body = post_chunked(tiny_http_server.server.http_port, chunks())
    assert status == 413, body
    error = json.loads(body[: int(headers["content-length"])])["error"]
    assert error["code"] == "request_too_large" and "at most 16777216 are allowed" in error["message"]
    assert headers["connection"] == "close"


def failing_streams(monkeypatch, error: BaseException) -> None:
    """Every engine request's stream delivers its first chunk, then `error`, then nothing."""
    from loraserve.server.engine.request_stream import RequestStream

    put = RequestStream.put
    delivered: dict[int, int] = {}

    def put_then_fail(self, item) -> None:  # type: ignore[no-untyped-def]
        count = delivered[id(self)] = delivered.get(id(self), 0) + 1
        if count == 1:
            put(self, item)
        elif count == 2:
            put(self, error)

    monkeypatch.setattr(RequestStream, "put", put_then_fail)


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (RuntimeError("a secret detail"), "INTERNAL", "server_error"),
        (Unavailable("the engine stopped before this request finished"), "UNAVAILABLE", "service_unavailable_error"),
    ],
    ids=["internal", "domain"],
)
def test_a_stream_that_fails_midway_ends_with_one_error_event(
    tiny_http_server, served, base_url, monkeypatch, caplog, error, status, kind
) -> None:
    failing_streams(monkeypatch, error)
    finished: list[tuple[str, str]] = []
    telemetry = tiny_http_server.server.telemetry
    rpc_finished = telemetry.rpc_finished
    monkeypatch.setattr(
        telemetry,
        "rpc_finished",
        lambda rpc, code, *a, **k: (finished.append((rpc, code)), rpc_finished(rpc, code, *a, **k)),
    )
    body = {"model": served, "prompt": "Hi", "max_tokens": 8, "min_tokens": 8, "stream": True}
    with caplog.at_level(logging.INFO, logger="loraserve.server.http_api.app"):
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
            text = response.read().decode()  # a stream cut short would raise here
            request_id = response.headers["x-request-id"]
    frames = text.split("\n\n")
    assert frames[-1] == "" and all(frame.startswith("data: ") for frame in frames[:-1])
    events = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]  # no [DONE]: it failed
    assert "choices" in events[0] and all("error" not in event for event in events[:-1])
    last = events[-1]["error"]
    assert set(last) == {"message", "type", "param", "code"} and last["type"] == kind
    assert finished == [("Completions", status)]
    if status == "INTERNAL":
        assert request_id in last["message"] and "secret" not in last["message"]
        logged = [r for r in caplog.records if r.exc_info and getattr(r, "request_id", None) == request_id]
        assert len(logged) == 1 and logged[0].exc_info[1] is error  # the traceback is in the log only
    else:
        assert last["message"] == str(error)


def test_the_largest_seed_with_several_choices_wraps_round_and_a_larger_one_names_seed(served, base_url) -> None:
    body = {"model": served, "prompt": "The sky", "n": 2, "max_tokens": 2, "seed": 2**64 - 1, "temperature": 1.0}
    assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=HANG_GUARD_S).status_code == 200
    refused = httpx.post(f"{base_url}/v1/completions", json=body | {"seed": 2**64}, timeout=HANG_GUARD_S)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed"
