"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions and /v1/models, with /health and /ready, on
the engine the gRPC servicers use (one model copy, one batch).

FastAPI (on Starlette and uvicorn) is used for what it is good at: validating bodies against pydantic models and
streaming server-sent events from an asyncio loop, with no thread per open stream. The engine hands each request's
chunks to the loop through a callback (RequestStream.listen). Bearer tokens, rate limits, request ids and telemetry
are the gRPC side's own (AccessInterceptor, the status table, Telemetry), so the two protocols cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.errors import LoraserveError
from loraserve.server.engine.outputs import GenerationChunk, GenerationResult
from loraserve.server.engine.params import GenerationRequest
from loraserve.server.http_api import errors, translate
from loraserve.server.http_api.protocol import ChatCompletionBody, CompletionBody
from loraserve.server.interceptors import Access, AccessInterceptor
from loraserve.server.status import CORRELATION_ID_HEADER, REQUEST_ID_HEADER

if TYPE_CHECKING:
    from loraserve.server.engine.engine import Engine
    from loraserve.server.engine.request_stream import RequestStream
    from loraserve.server.engine.telemetry import Telemetry

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready", "/docs", "/openapi.json")  # like gRPC health and Ready: no token needed
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer (it never sees it)
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there
ROUTE_NAMES = {
    "/v1/chat/completions": "ChatCompletions",
    "/v1/completions": "Completions",
    "/v1/models": "Models",
    "/health": "Health",
    "/ready": "Ready",
}


class ChunkQueue:
    """The chunks of several engine requests (the choices of one HTTP request), taken on the asyncio loop as
    (choice index, chunk). Each request's stream coalesces what the loop has not taken yet, so a client that reads
    slowly makes nothing pile up but its own output."""

    def __init__(self, streams: Sequence[RequestStream]) -> None:
        self.streams = streams
        self._arrived = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(self._arrived.set)
            except RuntimeError:  # the loop has closed: the server is stopping and nobody reads this any more
                pass

        for stream in streams:
            stream.notify(wake)

    async def chunks(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every chunk until each request has finished; an error the engine put is raised."""
        unfinished = set(range(len(self.streams)))
        while unfinished:
            self._arrived.clear()  # before taking: whatever arrives from now on sets it again
            taken = False
            for index in sorted(unfinished):
                item = self.streams[index].take_nowait()
                if item is None:
                    continue
                if isinstance(item, BaseException):
                    raise item
                taken = True
                yield index, item
                if item.finished:
                    unfinished.discard(index)
            if not taken:
                await self._arrived.wait()

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


class ClientStalled(Exception):
    """A streamed response's client stopped taking it."""


class Frame:
    """Around every request: a request id (the x-request-id header, and in the logs), the access checks, the body
    (read here and counted as it arrives, chunked or not, so that no client makes the server hold more than
    --max-message-bytes) and the request metrics. Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's
    disconnect from the routes, and a non-streaming request could not be cancelled when its client leaves."""

    def __init__(self, app: ASGIApp, api: HttpApi) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.monotonic()
        logger.info(
            "request received",
            extra={
                "protocol": "http",
                "path": request.url.path,
                "request_id": request_id,
                "correlation_id": request.headers.get(CORRELATION_ID_HEADER),
                "peer": f"{request.client.host}:{request.client.port}" if request.client else None,
            },
        )

        recorded = False

        def record() -> None:
            nonlocal recorded
            if self.api.telemetry is not None and not recorded:
                recorded = True
                path = request.url.path
                code = getattr(request.state, "status", "OK")
                seconds = time.monotonic() - started
                # A client's made-up paths would each be a series of their own: they count as one.
                route = ROUTE_NAMES.get(path, "unknown")
                self.api.telemetry.rpc_finished(route, code, seconds, protocol="http")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the last byte leaves: a client that has its answer finds it counted
            elif message["type"] == "http.response.body":  # a stream's part: the client must take it in time
                await self._send_in_time(request, send, message)
                return
            await send(message)

        try:
            await self._admit(request, scope, receive, send_with_id)
        except ClientStalled:  # the HTTP server closes the connection of a response left unfinished
            pass
        finally:
            record()  # a response that never finished (the client went away) counts too

    async def _send_in_time(self, request: Request, send: Send, message: Message) -> None:
        """Send a part of a streamed response, or give up on a client that has not taken it within
        --client-stall-timeout (it stopped reading): its engine requests are cancelled with the connection."""
        try:
            await asyncio.wait_for(send(message), self.api.client_stall_timeout)
        except TimeoutError:
            logger.warning(
                "cancelled a stream whose client stopped reading",
                extra={"protocol": "http", "request_id": request.state.request_id},
            )
            request.state.status = grpc.StatusCode.CANCELLED.name
            getattr(request.state, "cancel_stream", lambda: None)()
            raise ClientStalled from None

    async def _admit(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request, or read its body (counting it) and hand it to the routes."""
        declared = content_length(request)
        refusal = self.api.refusal(request) or (declared if isinstance(declared, errors.ApiError) else None)
        if refusal is not None:
            # Its body is left unread: close the connection after the answer when it has one, or the HTTP server
            # would read and drop whatever the client still sends, for as long as it sends it.
            has_body = declared != 0 and (declared is not None or is_chunked(request))
            await self.api.error_response(request, refusal, close=has_body)(scope, receive, send)
            return
        assert not isinstance(declared, errors.ApiError)
        body = await read_body(receive, declared, self.api.max_body_bytes, self.api.client_stall_timeout)
        if body is None:  # the client went away before its body had arrived
            request.state.status = grpc.StatusCode.CANCELLED.name
        elif isinstance(body, errors.ApiError):  # reading stopped there: the same as above
            await self.api.error_response(request, body, close=True)(scope, receive, send)
        else:
            await self.app(scope, replay(body, receive), send)


def content_length(request: Request) -> int | errors.ApiError | None:
    """The body's declared length: None without a Content-Length, an error for one that is not a single
    non-negative decimal number (int() would also take "+5", " 5" or "²")."""
    values = request.headers.getlist("content-length")
    if not values:
        return None
    if len(values) > 1 or not (values[0].isascii() and values[0].isdigit()):
        shown = ", ".join(repr(v) for v in values)
        return errors.bad_content_length(f"the Content-Length header ({shown}) must be one non-negative number")
    return int(values[0])


def is_chunked(request: Request) -> bool:
    return "transfer-encoding" in request.headers


async def read_body(
    receive: Receive, declared: int | None, limit: int, stall_s: float
) -> bytes | errors.ApiError | None:
    """The whole body, counted as it arrives, whether it has a Content-Length or is chunked: an error as soon as it
    passes `limit` or its declared length (and nothing more is read), when it ends short of that length, or when no
    part of it arrives for `stall_s` seconds (a slow sender holds a connection and a partial body); None when the
    client goes away first. The routes would read it whole anyway, to parse it."""
    if declared is not None and declared > limit:
        return errors.body_too_large(limit, declared)
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(receive(), stall_s)
        except TimeoutError:
            return errors.body_stalled(stall_s)
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if declared is not None and len(body) > declared:
            return errors.bad_content_length(f"the body is more than its Content-Length of {declared} bytes")
        if len(body) > limit:
            return errors.body_too_large(limit)
        if not message.get("more_body", False):
            break
    if declared is not None and len(body) != declared:
        return errors.bad_content_length(f"the body is {len(body)} bytes, not its Content-Length of {declared}")
    return bytes(body)


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body already read, as one message, then the client's own messages (a
    disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again


class HttpApi:
    """Builds the FastAPI app. `engine()` returns the engine or raises Unavailable while it loads; `serving()` says
    what gRPC health says."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        serving: Callable[[], bool],
        access: AccessInterceptor,
        telemetry: Telemetry | None,
        max_body_bytes: int,
        client_stall_timeout: float,
    ) -> None:
        self.engine = engine
        self.serving = serving
        self.access = access
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes
        self.client_stall_timeout = client_stall_timeout

    def build(self) -> FastAPI:
        app = FastAPI(title="loraserve", summary="OpenAI-compatible HTTP API", version="v1")
        app.add_middleware(Frame, api=self)
        app.add_exception_handler(RequestValidationError, self._invalid_body)  # type: ignore[arg-type]
        app.add_exception_handler(LoraserveError, self._domain_error)  # type: ignore[arg-type]
        app.add_exception_handler(HTTPException, self._http_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, self._unexpected)
        app.get("/health")(self.health)
        app.get("/ready")(self.ready)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        return app

    # ---- the frame around every request: request id, access, telemetry ----------------------------------------------

    def refusal(self, request: Request) -> errors.ApiError | None:
        """Why a request may not reach its route: no valid token, or its client's rate limit. (Its body is checked
        as it arrives: see read_body.)"""
        path = request.url.path
        if self.access.active and not path.startswith(OPEN_PATHS):
            peer = request.client.host if request.client else "unknown"  # the bare address, as gRPC's is keyed
            headers = {"authorization": request.headers.get("authorization", "")}
            denial = self.access.check(path, headers, peer, Access.READ)  # no admin routes over HTTP
            if denial is not None:
                return errors.from_status(denial.code, denial.message, denial.retry_after_s)
        return None

    # ---- errors ------------------------------------------------------------------------------------------------------

    @staticmethod
    def error_response(request: Request, error: errors.ApiError, close: bool = False) -> JSONResponse:
        """`close`: end the connection after the answer (the request's body was not read)."""
        request.state.status = error.grpc_code.name
        request_id = request.state.request_id
        logger.info(
            "request refused",
            extra={"protocol": "http", "request_id": request_id, "status": error.status, "reason": error.message},
        )
        headers = error.headers() | {REQUEST_ID_HEADER: request_id} | ({"Connection": "close"} if close else {})
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def _invalid_body(self, request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = str(first.get("msg", "invalid request body")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "is not a field this server knows (loraserve serves a subset of the OpenAI API)"
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        text = f"{param}: {message}" if param else message
        api_error = errors.ApiError(
            400, text, "invalid_request_error", param, "invalid_argument", grpc_code=grpc.StatusCode.INVALID_ARGUMENT
        )
        return self.error_response(request, api_error)

    async def _domain_error(self, request: Request, error: LoraserveError) -> JSONResponse:
        api_error = errors.from_error(error)
        if api_error is None:
            return await self._unexpected(request, error)
        return self.error_response(request, api_error)

    async def _http_error(self, request: Request, error: HTTPException) -> JSONResponse:
        found = error.status_code != 404
        message = f"{request.method} {request.url.path}: {error.detail}"
        api_error = errors.ApiError(
            error.status_code,
            message,
            "invalid_request_error" if found else "not_found_error",
            code=str(error.detail).lower().replace(" ", "_"),
            grpc_code=grpc.StatusCode.INVALID_ARGUMENT if found else grpc.StatusCode.NOT_FOUND,
        )
        return self.error_response(request, api_error)

    async def _unexpected(self, request: Request, error: Exception) -> JSONResponse:
        request_id = request.state.request_id
        logger.error("unexpected error", exc_info=error, extra={"protocol": "http", "request_id": request_id})
        return self.error_response(request, errors.internal(request_id))

    # ---- routes ------------------------------------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        """200 while the server is SERVING (gRPC health), 503 otherwise."""
        serving = self.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    async def ready(self) -> JSONResponse:
        """200 when the server takes requests; 503 while it loads or drains (the Ready RPC)."""
        self.engine().check_accepting()
        return JSONResponse({})

    async def models(self) -> JSONResponse:
        """The served model and every loaded adapter, as OpenAI model objects."""
        engine = self.engine()
        served = engine.loaded.description.name
        created = int(time.time() - engine.stats().uptime_seconds)
        data = [{"id": served, "object": "model", "created": created, "owned_by": "loraserve", "root": served}]
        data += [
            {
                "id": a.id,
                "object": "model",
                "created": created,
                "owned_by": "loraserve",
                "root": a.source,
                "parent": served,
            }
            for a in engine.adapters.infos()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, body: ChatCompletionBody, request: Request) -> Response:
        def respond(request_id: str, created: int, results: list[GenerationResult]) -> dict[str, Any]:
            return translate.chat_response(request_id, body.model, created, results, body.logprobs)

        return await self._generate(body, request, translate.chat_requests, self._chat_events, respond)

    async def completions(self, body: CompletionBody, request: Request) -> Response:
        def respond(request_id: str, created: int, results: list[GenerationResult]) -> dict[str, Any]:
            return translate.completion_response(request_id, body.model, created, results, body)

        return await self._generate(body, request, translate.completion_requests, self._completion_events, respond)

    async def _generate(
        self,
        body: Any,
        request: Request,
        make_requests: Callable[[Any, str, str], list[GenerationRequest]],
        events: Callable[[ChunkQueue, Any, str, int], AsyncIterator[dict[str, Any]]],
        respond: Callable[[str, int, list[GenerationResult]], dict[str, Any]],
    ) -> Response:
        """Submit a body's choices; stream their events, or answer with the whole results."""
        engine = self.engine()
        request_id = request.state.request_id
        requests = make_requests(body, self._adapter(engine, body.model), request_id)
        queue = ChunkQueue(await self._submit(engine, requests))
        created = int(time.time())
        if body.stream:
            return self._event_stream(queue, events(queue, body, request_id, created), request)
        results = await self._results(queue, request)
        if results is None:  # the client went away; nobody reads this answer
            request.state.status = grpc.StatusCode.CANCELLED.name
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(respond(request_id, created, results))

    # ---- helpers -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _adapter(engine: Engine, model: str) -> str:
        return translate.adapter_for(model, engine.loaded.description.name, (a.id for a in engine.adapters.infos()))

    @staticmethod
    async def _submit(engine: Engine, requests: list[GenerationRequest]) -> list[RequestStream]:
        """Submit every choice (tokenizing and compiling off the event loop); if one is refused, cancel the rest."""
        streams: list[RequestStream] = []
        try:
            for generation in requests:
                streams.append(await run_in_threadpool(engine.submit, generation))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    @staticmethod
    async def _results(queue: ChunkQueue, request: Request) -> list[GenerationResult] | None:
        """Every choice's whole result; None when the client went away first (its requests are cancelled)."""
        chunks: list[list[GenerationChunk]] = [[] for _ in queue.streams]

        async def collect() -> None:
            async for index, chunk in queue.chunks():
                chunks[index].append(chunk)

        task = asyncio.create_task(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    queue.cancel()
                    return None
            task.result()  # raises the engine's error, if it put one
        except BaseException:
            queue.cancel()
            raise
        return [GenerationResult.from_chunks(choice) for choice in chunks]

    @staticmethod
    def _event_stream(queue: ChunkQueue, events: AsyncIterator[dict[str, Any]], request: Request) -> StreamingResponse:
        request.state.cancel_stream = queue.cancel  # for Frame, when the client stops reading

        async def frames() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as error:  # the headers are sent: the error goes in the stream, then it ends
                yield f"data: {json.dumps(HttpApi._stream_error(request, error).body())}\n\n"
            except BaseException:  # cancelled: the client went away, or the server is stopping; nobody reads on
                request.state.status = grpc.StatusCode.CANCELLED.name
                raise
            finally:  # a client that went away, or an error: free the rows at the next step
                queue.cancel()

        return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def _stream_error(request: Request, error: Exception) -> errors.ApiError:
        """The last event of a stream that failed, in OpenAI's error shape; its status goes to the metrics. An
        unexpected error gets a generic message with the request id, and its traceback goes to the log only."""
        request_id = request.state.request_id
        api_error = errors.from_error(error)
        if api_error is None:
            logger.error(
                "unexpected error mid-stream", exc_info=error, extra={"protocol": "http", "request_id": request_id}
            )
            api_error = errors.internal(request_id)
        else:
            logger.info(
                "request failed mid-stream",
                extra={
                    "protocol": "http",
                    "request_id": request_id,
                    "status": api_error.status,
                    "reason": api_error.message,
                },
            )
        request.state.status = api_error.grpc_code.name
        return api_error

    @staticmethod
    async def _chat_events(
        queue: ChunkQueue, body: ChatCompletionBody, request_id: str, created: int
    ) -> AsyncIterator[dict[str, Any]]:
        extra = {"usage": None} if body.include_usage else {}
        for index in range(len(queue.streams)):
            yield translate.chat_chunk(request_id, body.model, created, index, None, body.logprobs) | extra
        last: dict[int, GenerationChunk] = {}
        async for index, chunk in queue.chunks():
            if chunk.text or chunk.finished or chunk.tokens:
                yield translate.chat_chunk(request_id, body.model, created, index, chunk, body.logprobs) | extra
            if chunk.finished:
                last[index] = chunk
        if body.include_usage:
            finals = [last[i] for i in range(len(queue.streams))]
            usage = translate.usage(finals, len(finals))
            yield translate.usage_chunk(request_id, body.model, created, "chat.completion.chunk", usage)

    @staticmethod
    async def _completion_events(
        queue: ChunkQueue, body: CompletionBody, request_id: str, created: int
    ) -> AsyncIterator[dict[str, Any]]:
        extra = {"usage": None} if body.include_usage else {}
        offsets = [0] * len(queue.streams)
        last: dict[int, GenerationChunk] = {}
        logprobs = body.logprobs is not None
        async for index, chunk in queue.chunks():
            if chunk.text or chunk.finished or chunk.tokens:
                event = translate.completion_chunk(
                    request_id, body.model, created, index, chunk, offsets[index], logprobs
                )
                yield event | extra
            offsets[index] += len(chunk.text)
            if chunk.finished:
                last[index] = chunk
        if body.include_usage:
            finals = [last[i] for i in range(len(queue.streams))]
            yield translate.usage_chunk(
                request_id, body.model, created, "text_completion", translate.usage(finals, body.n)
            )
