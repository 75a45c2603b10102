"""The InferenceService servicer: one short method per RPC (request id, convert, submit, translate, return).
No tensors here; the engine does the work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from loraserve import __version__
from loraserve.errors import Unavailable
from loraserve.server import convert, rag
from loraserve.server.status import rpc_method
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from loraserve.server.engine import Engine
    from loraserve.server.request_stream import RequestStream


def cancel_with_call(context: grpc.ServicerContext, stream: RequestStream) -> None:
    """Cancel the engine's request when the call ends early (client cancel, deadline); at once if it already has."""
    if not context.add_callback(stream.cancel):
        stream.cancel()


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None when it set none."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Serves loraserve.v1.InferenceService on an engine attached once the model is loaded."""

    def __init__(self) -> None:
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise Unavailable("the model is still loading; retry in a moment")
        return self._engine

    @rpc_method
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.GenerateResponse:
        params = convert.generation_request(request, request_id, deadline_of(context))
        stream = self.engine.submit(params)
        cancel_with_call(context, stream)
        return convert.generate_response(stream.result())

    @rpc_method
    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext, request_id: str
    ) -> Iterator[pb.GenerateStreamResponse]:
        params = convert.generation_request(request, request_id, deadline_of(context))
        stream = self.engine.submit(params)
        cancel_with_call(context, stream)
        for chunk in stream:
            yield convert.stream_response(chunk)

    @rpc_method
    def RagQuery(
        self, request: pb.RagQueryRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.RagQueryResponse:
        engine = self.engine
        query = convert.rag_query(request, request_id, deadline_of(context), engine.config.max_rag_documents)
        answer = rag.answer(query, engine.submit, on_stream=lambda stream: cancel_with_call(context, stream))
        return convert.rag_response(answer)

    @rpc_method
    def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.ModelInfoResponse:
        engine = self.engine
        return convert.model_info_response(
            engine.loaded.description,
            engine.loaded.adapters.infos(),
            engine.config,
            engine.stats(),
            engine.loaded.prompt_format.name,
            __version__,
        )

    @rpc_method
    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.TokenizeResponse:
        text, messages, return_tokens = convert.tokenize_request(request)
        count, details = self.engine.tokenize(text, messages, details=return_tokens)
        return convert.tokenize_response(count, details)
