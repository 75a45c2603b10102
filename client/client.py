"""Sync and asyncio clients for loraserve.v1.InferenceService and CollectionService, with typed results and default
deadlines. Imports only grpc and the generated code: usable where torch is not installed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client.types import (
    CollectionInfo,
    DeleteResult,
    Generation,
    GenerationOptions,
    LoraserveRpcError,
    ModelInfo,
    RagAnswer,
    StreamChunk,
    Tokenization,
    UpsertResult,
    build_documents,
    build_generation,
    build_rag_query,
    build_tokenize,
)
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 120.0
Messages = Sequence[Mapping[str, str]]
Metadata = Sequence[tuple[str, str]]


def _health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def tls_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS to the server: verified with the CA bundle (the system's when empty); with cert and key, mutual TLS."""

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def _with_token(metadata: Metadata, token: str | None) -> tuple[tuple[str, str], ...]:
    return ((("authorization", f"Bearer {token}"),) if token else ()) + tuple(metadata)


class Client:
    """A blocking client. Every call takes `timeout` (seconds; default the client's) and extra `metadata`, such as
    ("x-correlation-id", "...") to find the call in the server's logs. `credentials` (see tls_credentials) connect
    over TLS; `token` is sent as a bearer token. Failures raise LoraserveRpcError."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.timeout = timeout
        self.metadata = _with_token(metadata, token)
        secure = credentials is not None
        self._channel = channel or (
            grpc.secure_channel(target, credentials) if secure else grpc.insecure_channel(target)
        )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._collections = pb_grpc.CollectionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None, metadata: Metadata) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata + tuple(metadata))
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerationOptions],
    ) -> Generation:
        """The whole completion of a raw prompt or of chat messages. At most one of json_schema (a mapping or JSON
        text), json_object=True, regex, choice (a list of strings) and grammar (Lark) constrains the output; a
        completion that satisfies it ends with StopReason.CONSTRAINT_COMPLETE."""
        request = build_generation(pb.GenerateRequest(), prompt, messages, options)
        return Generation.from_proto(self._call(self._stub.Generate, request, timeout, metadata))

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerationOptions],
    ) -> Iterator[StreamChunk]:
        """The completion as it is generated; the last chunk carries the stop reason. Leaving the loop early
        cancels the request on the server."""
        request = build_generation(pb.GenerateStreamRequest(), prompt, messages, options)
        call = self._stub.GenerateStream(
            request, timeout=timeout or self.timeout, metadata=self.metadata + tuple(metadata)
        )
        try:
            for response in call:
                yield StreamChunk.from_proto(response)
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None
        finally:
            call.cancel()

    def rag_query(
        self,
        query: str,
        documents: Sequence[Mapping[str, Any]] = (),
        *,
        collection: str = "",
        top_k: int | None = None,
        min_similarity: float | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerationOptions],
    ) -> RagAnswer:
        """Answer a question from documents given as {"id", "text", "title"?, "metadata"?} mappings, from a stored
        collection, or from both."""
        request = build_rag_query(query, documents, collection, top_k, min_similarity, options)
        return RagAnswer.from_proto(self._call(self._stub.RagQuery, request, timeout, metadata))

    def upsert_documents(
        self,
        collection: str,
        documents: Sequence[Mapping[str, Any]],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> UpsertResult:
        """Add or replace documents in a collection (created when missing); durable when this returns."""
        request = pb.UpsertDocumentsRequest(collection=collection, documents=build_documents(documents))
        return UpsertResult.from_proto(self._call(self._collections.UpsertDocuments, request, timeout, metadata))

    def delete_documents(
        self, collection: str, document_ids: Sequence[str], *, timeout: float | None = None, metadata: Metadata = ()
    ) -> DeleteResult:
        request = pb.DeleteDocumentsRequest(collection=collection, document_ids=list(document_ids))
        return DeleteResult.from_proto(self._call(self._collections.DeleteDocuments, request, timeout, metadata))

    def list_collections(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[CollectionInfo]:
        request = pb.ListCollectionsRequest()
        response = self._call(self._collections.ListCollections, request, timeout, metadata)
        return [CollectionInfo.from_proto(c) for c in response.collections]

    def delete_collection(self, name: str, *, timeout: float | None = None, metadata: Metadata = ()) -> None:
        request = pb.DeleteCollectionRequest(name=name)
        self._call(self._collections.DeleteCollection, request, timeout, metadata)

    def model_info(self, *, timeout: float | None = None, metadata: Metadata = ()) -> ModelInfo:
        return ModelInfo.from_proto(self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout, metadata))

    def tokenize(
        self,
        text: str | None = None,
        *,
        messages: Messages | None = None,
        return_tokens: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Tokenization:
        request = build_tokenize(text, messages, return_tokens)
        return Tokenization.from_proto(self._call(self._stub.Tokenize, request, timeout, metadata))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status, "SERVING" or "NOT_SERVING"; an unknown service raises NOT_FOUND."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_status(self._call(self._health.Check, request, timeout, ()))

    def ready(self, *, timeout: float | None = None) -> None:
        """Return when the server takes requests; LoraserveRpcError (UNAVAILABLE) while it loads or drains."""
        self._call(self._stub.Ready, pb.ReadyRequest(), timeout, ())


class AsyncClient:
    """The asyncio twin of Client: the same methods, awaited (stream is an async iterator)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.timeout = timeout
        self.metadata = _with_token(metadata, token)
        secure = credentials is not None
        self._channel = channel or (
            grpc.aio.secure_channel(target, credentials) if secure else grpc.aio.insecure_channel(target)
        )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._collections = pb_grpc.CollectionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None, metadata: Metadata) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.metadata + tuple(metadata))
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerationOptions],
    ) -> Generation:
        request = build_generation(pb.GenerateRequest(), prompt, messages, options)
        return Generation.from_proto(await self._call(self._stub.Generate, request, timeout, metadata))

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerationOptions],
    ) -> AsyncIterator[StreamChunk]:
        request = build_generation(pb.GenerateStreamRequest(), prompt, messages, options)
        call = self._stub.GenerateStream(
            request, timeout=timeout or self.timeout, metadata=self.metadata + tuple(metadata)
        )
        try:
            async for response in call:
                yield StreamChunk.from_proto(response)
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None
        finally:
            call.cancel()

    async def rag_query(
        self,
        query: str,
        documents: Sequence[Mapping[str, Any]] = (),
        *,
        collection: str = "",
        top_k: int | None = None,
        min_similarity: float | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerationOptions],
    ) -> RagAnswer:
        request = build_rag_query(query, documents, collection, top_k, min_similarity, options)
        return RagAnswer.from_proto(await self._call(self._stub.RagQuery, request, timeout, metadata))

    async def upsert_documents(
        self,
        collection: str,
        documents: Sequence[Mapping[str, Any]],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> UpsertResult:
        request = pb.UpsertDocumentsRequest(collection=collection, documents=build_documents(documents))
        response = await self._call(self._collections.UpsertDocuments, request, timeout, metadata)
        return UpsertResult.from_proto(response)

    async def delete_documents(
        self, collection: str, document_ids: Sequence[str], *, timeout: float | None = None, metadata: Metadata = ()
    ) -> DeleteResult:
        request = pb.DeleteDocumentsRequest(collection=collection, document_ids=list(document_ids))
        response = await self._call(self._collections.DeleteDocuments, request, timeout, metadata)
        return DeleteResult.from_proto(response)

    async def list_collections(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[CollectionInfo]:
        request = pb.ListCollectionsRequest()
        response = await self._call(self._collections.ListCollections, request, timeout, metadata)
        return [CollectionInfo.from_proto(c) for c in response.collections]

    async def delete_collection(self, name: str, *, timeout: float | None = None, metadata: Metadata = ()) -> None:
        request = pb.DeleteCollectionRequest(name=name)
        await self._call(self._collections.DeleteCollection, request, timeout, metadata)

    async def model_info(self, *, timeout: float | None = None, metadata: Metadata = ()) -> ModelInfo:
        response = await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout, metadata)
        return ModelInfo.from_proto(response)

    async def tokenize(
        self,
        text: str | None = None,
        *,
        messages: Messages | None = None,
        return_tokens: bool = False,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Tokenization:
        request = build_tokenize(text, messages, return_tokens)
        return Tokenization.from_proto(await self._call(self._stub.Tokenize, request, timeout, metadata))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_status(await self._call(self._health.Check, request, timeout, ()))
