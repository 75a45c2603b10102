"""The HTTP API's frame at the ASGI level, with no server and no model: a body is counted as it arrives and refused
(413) once it passes --max-message-bytes, with nothing more read; a Content-Length that lies or is not a number is a
400. Driving the app directly shows what the app itself does, whatever the HTTP server in front of it checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest

from loraserve.config import ServerConfig
from loraserve.errors import Unavailable
from loraserve.server.http_api.app import HttpApi
from loraserve.server.interceptors import AccessInterceptor

LIMIT = 4096
BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    pulled: int = 0  # receive() calls that got a piece of the body
    overread: bool = False  # the app asked for more than the test's bound

    def error(self) -> dict[str, str]:
        return json.loads(self.body)["error"]


def loading_engine() -> None:
    raise Unavailable("the model is loading")  # a body that gets through reaches the route, which answers 503


def make_app(monkeypatch: pytest.MonkeyPatch, stall_s: float = 60.0):  # type: ignore[no-untyped-def]
    for name in ("LORASERVE_AUTH_TOKENS", "LORASERVE_ADMIN_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    access = AccessInterceptor(ServerConfig())
    return HttpApi(loading_engine, lambda: True, access, None, LIMIT, stall_s).build()  # type: ignore[arg-type]


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    return make_app(monkeypatch)


def post_scope(path: str, headers: Iterable[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope of a POST of JSON to `path` from a loopback client, with `headers` besides Content-Type."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def call(
    app,  # type: ignore[no-untyped-def]
    pieces: Iterable[bytes],
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    bound: int = 1000,
    ends: bool = True,
) -> Answer:
    """POST /v1/completions with `pieces` as the body, one receive() each. `ends`: the last piece closes the body
    (else it goes on for ever, up to `bound` pieces, after which the test's client gives up)."""
    answer = Answer()
    items: Iterator[bytes] = iter(pieces)
    upcoming = next(items, None)
    scope = post_scope("/v1/completions", headers)

    async def receive() -> dict:
        nonlocal upcoming
        if upcoming is None:
            await asyncio.Event().wait()  # the body has ended; the client stays connected
        if answer.pulled >= bound:
            answer.overread = True
            return {"type": "http.disconnect"}
        piece, upcoming = upcoming, next(items, None)
        answer.pulled += 1
        return {"type": "http.request", "body": piece, "more_body": upcoming is not None or not ends}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode().lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    return answer


def forever(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def test_a_body_that_gets_through_reaches_the_route_whole(app) -> None:  # type: ignore[no-untyped-def]
    answer = call(app, [BODY[:5], BODY[5:]], [(b"content-length", str(len(BODY)).encode())])
    assert answer.status == 503 and answer.error()["type"] == "service_unavailable_error"  # parsed, then the engine
    assert call(app, [BODY], [(b"transfer-encoding", b"chunked")]).status == 503


def test_a_chunked_body_is_refused_once_it_passes_the_limit_and_no_more_is_read(app) -> None:  # type: ignore[no-untyped-def]
    answer = call(app, forever(b"x" * 1000), [(b"transfer-encoding", b"chunked")], bound=50, ends=False)
    assert answer.status == 413 and not answer.overread
    assert answer.pulled == LIMIT // 1000 + 1  # the piece that passed the limit was the last one read
    error = answer.error()
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert f"at most {LIMIT} are allowed" in error["message"]
    assert answer.headers["connection"] == "close" and answer.headers["x-request-id"]


def test_a_declared_length_over_the_limit_is_refused_before_reading(app) -> None:  # type: ignore[no-untyped-def]
    answer = call(app, forever(b"x" * 1000), [(b"content-length", str(LIMIT + 1).encode())], bound=50, ends=False)
    assert answer.status == 413 and answer.pulled == 0
    assert answer.error()["message"].startswith(f"the body is {LIMIT + 1} bytes; at most {LIMIT}")
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("declared", "pieces", "fragment"),
    [
        (10, [BODY], "more than its Content-Length of 10"),  # a valid body, longer than it said
        (10, [BODY[:8], BODY[8:]], "more than its Content-Length of 10"),
        (len(BODY) + 5, [BODY], f"{len(BODY)} bytes, not its Content-Length of {len(BODY) + 5}"),
    ],
)
def test_a_content_length_that_lies_is_refused(app, declared, pieces, fragment) -> None:  # type: ignore[no-untyped-def]
    answer = call(app, pieces, [(b"content-length", str(declared).encode())])
    assert answer.status == 400, answer.body
    assert answer.error()["code"] == "invalid_content_length" and fragment in answer.error()["message"]
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize(
    "values",
    [[b"abc"], [b"-5"], [b"+5"], [b"0x10"], [b"1e3"], [b""], [b"\xb2"], [b"10", b"11"]],
    ids=["letters", "negative", "plus", "hex", "exponent", "empty", "superscript", "two-values"],
)
def test_a_content_length_that_is_not_a_length_is_refused(app, values) -> None:  # type: ignore[no-untyped-def]
    answer = call(app, [BODY], [(b"content-length", value) for value in values])
    assert answer.status == 400, answer.body
    error = answer.error()
    assert error["code"] == "invalid_content_length" and "Content-Length" in error["message"]
    assert answer.pulled == 0 and answer.headers["connection"] == "close"


def test_a_body_that_stops_arriving_is_refused_408_and_the_connection_closed(monkeypatch) -> None:
    """A slow sender (a slowloris) holds a connection and a partial body: after --client-stall-timeout without a
    byte of it, it gets 408 and the connection is closed."""
    app = make_app(monkeypatch, stall_s=0.2)
    answer = call(app, [BODY[:5]], [(b"content-length", str(len(BODY)).encode())], ends=False)
    assert answer.status == 408 and answer.pulled == 1
    assert answer.error()["code"] == "request_timeout" and "--client-stall-timeout" in answer.error()["message"]
    assert answer.headers["connection"] == "close"
