"""The servicers of InferenceService, AdapterService and CollectionService: one short method per RPC (request id,
convert, submit, translate, return). No tensors here; the engine and the retriever do the work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from loraserve import __version__
from loraserve.config import ModelConfig, RagConfig
from loraserve.errors import DeadlineExceeded, Unavailable
from loraserve.server import convert
from loraserve.server.engine.outputs import StopReason
from loraserve.server.models.adapters.sources import resolve_source
from loraserve.server.retrieval import rag
from loraserve.server.retrieval.fair_worker import Budget
from loraserve.server.rpc import rpc_method
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from loraserve.server.engine.engine import Engine
    from loraserve.server.engine.request_stream import RequestStream
    from loraserve.server.engine.telemetry import Telemetry
    from loraserve.server.retrieval.retriever import Retriever
    from loraserve.server.stall_guard import StallGuard


def cancel_with_call(context: grpc.ServicerContext, stream: RequestStream) -> None:
    """Cancel the engine's request when the call ends early (client cancel, deadline); at once if it already has."""
    if not context.add_callback(stream.cancel):
        stream.cancel()


# grpc reports about 9e18 seconds remaining for a call without a deadline; anything this far off is none.
NO_DEADLINE_S = 1e9


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when it set none."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < NO_DEADLINE_S else None


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None when it set none."""
    remaining = time_left(context)
    return time.monotonic() + remaining if remaining is not None else None


def refuse_past_deadline(deadline: float | None, stop_reason: StopReason | None) -> None:
    """DEADLINE_EXCEEDED for a request the engine dropped at its deadline. The engine drops it when its own clock
    passes the deadline, which can be a moment before gRPC's timer fires: without this, that moment would let a
    partial result through as OK (stop reason CANCELLED)."""
    if stop_reason is StopReason.CANCELLED and deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's deadline passed before it finished")


class EngineHolder:
    """The engine, attached once the model is loaded; UNAVAILABLE until then."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self.telemetry: Telemetry | None = None  # RPC counts and latencies, when the server has telemetry

    def attach(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise Unavailable("the model is still loading; retry in a moment")
        return self._engine


class InferenceServicer(EngineHolder, pb_grpc.InferenceServiceServicer):
    """Serves loraserve.v1.InferenceService."""

    def __init__(self, retriever: Retriever, rag_config: RagConfig) -> None:
        super().__init__()
        self.retriever = retriever
        self.rag_config = rag_config
        self.stall_guard: StallGuard | None = None  # the server's; it cancels streams whose client stopped reading

    @rpc_method
    def Ready(self, request: pb.ReadyRequest, context: grpc.ServicerContext, request_id: str) -> pb.ReadyResponse:
        self.engine.check_accepting()
        return pb.ReadyResponse()

    @rpc_method
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.GenerateResponse:
        params = convert.generation_request(request, request_id, deadline_of(context))
        stream = self.engine.submit(params)
        cancel_with_call(context, stream)
        result = stream.result()
        refuse_past_deadline(params.deadline, result.stop_reason)
        return convert.generate_response(result)

    @rpc_method
    def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext, request_id: str
    ) -> Iterator[pb.GenerateStreamResponse]:
        params = convert.generation_request(request, request_id, deadline_of(context))
        stream = self.engine.submit(params)
        cancel_with_call(context, stream)
        for chunk in stream:
            refuse_past_deadline(params.deadline, chunk.stop_reason)
            guard = self.stall_guard.sending(request_id, context.cancel) if self.stall_guard else nullcontext()
            with guard:  # gRPC resumes this generator once the message is sent
                yield convert.stream_response(chunk)

    @rpc_method
    def RagQuery(
        self, request: pb.RagQueryRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.RagQueryResponse:
        engine = self.engine
        query = convert.rag_query(request, request_id, deadline_of(context), self.rag_config)
        answer = rag.answer(
            query,
            self.retriever,
            engine.submit,
            on_stream=lambda stream: cancel_with_call(context, stream),
            abandoned=lambda: not context.is_active(),
        )
        refuse_past_deadline(query.deadline, answer.result.stop_reason if answer.result else None)
        return convert.rag_response(answer)

    @rpc_method
    def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.ModelInfoResponse:
        engine = self.engine
        return convert.model_info_response(
            engine.loaded.description,
            engine.adapters.infos(),
            engine.config,
            self.rag_config,
            engine.stats(),
            engine.loaded.prompt_format.name,
            __version__,
            self.retriever.embedding_model,
            engine.max_input_chars,
        )

    @rpc_method
    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.TokenizeResponse:
        text, messages, return_tokens = convert.tokenize_request(request)
        count, details = self.engine.tokenize(text, messages, details=return_tokens)
        return convert.tokenize_response(count, details)


class AdapterServicer(EngineHolder, pb_grpc.AdapterServiceServicer):
    """Serves loraserve.v1.AdapterService: adapters loaded and unloaded while the server runs."""

    def __init__(self, model_config: ModelConfig) -> None:
        super().__init__()
        self.model_config = model_config

    @rpc_method
    def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.LoadAdapterResponse:
        config = self.model_config
        spec = resolve_source(request.adapter_id, request.source, config.adapter_root, config.adapter_buckets)
        version = request.version if request.HasField("version") else None
        outcome = self.engine.load_adapter(spec, Path(config.model_cache), version, deadline_of(context))
        return pb.LoadAdapterResponse(adapter=convert.adapter_info(outcome.info), evicted=list(outcome.evicted))

    @rpc_method
    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.UnloadAdapterResponse:
        self.engine.unload_adapter(request.adapter_id, deadline_of(context))
        return pb.UnloadAdapterResponse(adapter_id=request.adapter_id)

    @rpc_method
    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.ListAdaptersResponse:
        adapters = self.engine.adapters
        return pb.ListAdaptersResponse(
            adapters=[convert.adapter_info(a) for a in adapters.infos()], max_adapters=adapters.max_adapters
        )


class CollectionServicer(pb_grpc.CollectionServiceServicer):
    """Serves loraserve.v1.CollectionService: stored document collections (they need no model, only embeddings)."""

    def __init__(self, retriever: Retriever, rag_config: RagConfig) -> None:
        self.retriever = retriever
        self.rag_config = rag_config
        self.telemetry: Telemetry | None = None

    @rpc_method
    def UpsertDocuments(
        self, request: pb.UpsertDocumentsRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.UpsertDocumentsResponse:
        documents = convert.upsert_documents(request, self.rag_config)
        budget = Budget(deadline_of(context), lambda: not context.is_active())
        outcome, info = self.retriever.upsert(request.collection, documents, budget)
        return convert.upsert_response(outcome, info)

    @rpc_method
    def DeleteDocuments(
        self, request: pb.DeleteDocumentsRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.DeleteDocumentsResponse:
        deleted, not_found, info = self.retriever.delete_documents(request.collection, list(request.document_ids))
        return pb.DeleteDocumentsResponse(
            collection=convert.collection_info(info), deleted_documents=deleted, not_found=not_found
        )

    @rpc_method
    def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.ListCollectionsResponse:
        return pb.ListCollectionsResponse(
            collections=[convert.collection_info(c) for c in self.retriever.collections()]
        )

    @rpc_method
    def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.ServicerContext, request_id: str
    ) -> pb.DeleteCollectionResponse:
        self.retriever.drop(request.name)
        return pb.DeleteCollectionResponse(name=request.name)
