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
from loraserve.server.interceptors import AccessInterceptor
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
    """The chunks of several engine requests (the choices of one HTTP request), delivered to the asyncio loop as
    (choice index, chunk or error) in the order the engine produced them."""

    def __init__(self, streams: Sequence[RequestStream]) -> None:
        self.streams = streams
        self._queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for index, stream in enumerate(streams):
            stream.listen(self._deliverer(loop, index))

    def _deliverer(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[Any], None]:
        def deliver(item: GenerationChunk | BaseException) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))
            except RuntimeError:  # the loop has closed: the server is stopping and nobody reads this any more
                pass

        return deliver

    async def chunks(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every chunk until each request has finished; an error the engine put is raised."""
        unfinished = len(self.streams)
        while unfinished:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            unfinished -= item.finished

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


class Frame:
    """Around every request: a request id (the x-request-id header, and in the logs), the access and size checks,
    and the request metrics. Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the
    routes, and a non-streaming request could not be cancelled when its client leaves."""

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
                self.api.telemetry.rpc_finished(ROUTE_NAMES.get(path, path), code, seconds, protocol="http")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the last byte leaves: a client that has its answer finds it counted
            await send(message)

        try:
            refusal = self.api.refusal(request)
            if refusal is not None:
                await self.api.error_response(request, refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            record()  # a response that never finished (the client went away) counts too


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
    ) -> None:
        self.engine = engine
        self.serving = serving
        self.access = access
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes

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
        """Why a request may not reach its route: no valid token, its client's rate limit, a body over the limit."""
        path = request.url.path
        if self.access.active and not path.startswith(OPEN_PATHS):
            client = request.client
            peer = f"{client.host}:{client.port}" if client else "unknown"
            denial = self.access.check(path, {"authorization": request.headers.get("authorization", "")}, peer)
            if denial is not None:
                return errors.from_status(denial.code, denial.message, denial.retry_after_s)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return errors.ApiError(
                413,
                f"the body is {length} bytes; at most {self.max_body_bytes} are allowed (the server's "
                "--max-message-bytes)",
                "invalid_request_error",
                code="request_too_large",
                grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        return None

    # ---- errors ------------------------------------------------------------------------------------------------------

    @staticmethod
    def error_response(request: Request, error: errors.ApiError) -> JSONResponse:
        request.state.status = error.grpc_code.name
        request_id = request.state.request_id
        logger.info(
            "request refused",
            extra={"protocol": "http", "request_id": request_id, "status": error.status, "reason": error.message},
        )
        headers = error.headers() | {REQUEST_ID_HEADER: request_id}
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
            return self._event_stream(queue, events(queue, body, request_id, created))
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
    def _event_stream(queue: ChunkQueue, events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def frames() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except LoraserveError as error:  # the headers are sent: the error goes in the stream, then it ends
                api_error = errors.from_error(error)
                if api_error is not None:
                    yield f"data: {json.dumps(api_error.body())}\n\n"
            finally:  # a client that went away, or an error: free the rows at the next step
                queue.cancel()

        return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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
