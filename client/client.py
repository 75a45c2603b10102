"""Sync and asyncio clients for every service of the contract (InferenceService, AdapterService, CollectionService
and grpc.health.v1), with typed results and default deadlines. Imports only grpc and the generated code: usable where
torch is not installed.

Each call is described once, in `_Calls`: which RPC it is, how its request is built and how the response becomes
the typed result. Client runs the descriptions blocking; AsyncClient runs the same ones on grpc.aio, so every method
of AsyncClient is awaited (and `stream` is an async iterator)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client.types import (
    AdapterList,
    AdapterLoad,
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
T = TypeVar("T")


def tls_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS to the server: verified with the CA bundle (the system's when empty); with cert and key, mutual TLS."""

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def _with_token(metadata: Metadata, token: str | None) -> tuple[tuple[str, str], ...]:
    return ((("authorization", f"Bearer {token}"),) if token else ()) + tuple(metadata)


def _nothing(_: object) -> None:
    return None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC to make: the service's stub and method, the request, and how each response becomes a result."""

    service: str  # a key of _Calls._stubs
    method: str
    request: Any
    parse: Callable[[Any], T]


class _Calls:
    """Every call of the contract, described once. Subclasses run the descriptions (`_unary`, `_streaming`). Every
    call takes `timeout` (seconds; default the client's) and extra `metadata`, such as ("x-correlation-id", "...")
    to find the call in the server's logs. Failures raise LoraserveRpcError."""

    timeout: float
    metadata: tuple[tuple[str, str], ...]
    _stubs: dict[str, Any]

    def _stubs_for(self, channel: grpc.Channel | grpc.aio.Channel) -> dict[str, Any]:
        return {
            "inference": pb_grpc.InferenceServiceStub(channel),
            "adapters": pb_grpc.AdapterServiceStub(channel),
            "collections": pb_grpc.CollectionServiceStub(channel),
            "health": health_pb2_grpc.HealthStub(channel),
        }

    def _method(self, call: Call[Any]) -> Any:
        return getattr(self._stubs[call.service], call.method)

    def _options(self, timeout: float | None, metadata: Metadata) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self.metadata + tuple(metadata)}

    def _unary(self, call: Call[T], timeout: float | None, metadata: Metadata) -> Any:
        raise NotImplementedError

    def _streaming(self, call: Call[T], timeout: float | None, metadata: Metadata) -> Any:
        raise NotImplementedError

    # ---- InferenceService --------------------------------------------------------------------------------------------

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
        return self._unary(Call("inference", "Generate", request, Generation.from_proto), timeout, metadata)

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
        return self._streaming(Call("inference", "GenerateStream", request, StreamChunk.from_proto), timeout, metadata)

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
        return self._unary(Call("inference", "RagQuery", request, RagAnswer.from_proto), timeout, metadata)

    def model_info(self, *, timeout: float | None = None, metadata: Metadata = ()) -> ModelInfo:
        call = Call("inference", "ModelInfo", pb.ModelInfoRequest(), ModelInfo.from_proto)
        return self._unary(call, timeout, metadata)

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
        return self._unary(Call("inference", "Tokenize", request, Tokenization.from_proto), timeout, metadata)

    def ready(self, *, timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Return when the server takes requests; LoraserveRpcError (UNAVAILABLE) while it loads or drains."""
        return self._unary(Call("inference", "Ready", pb.ReadyRequest(), _nothing), timeout, metadata)

    # ---- AdapterService (an admin token when the server has them) ----------------------------------------------------

    def load_adapter(
        self,
        adapter_id: str,
        source: str,
        *,
        version: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> AdapterLoad:
        """Load an adapter from a folder under the server's --adapter-root or from S3 (s3://bucket/prefix, in an
        allowed bucket; `version` pins an S3 version) and serve it as `adapter_id`."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, source=source)
        if version is not None:
            request.version = version
        return self._unary(Call("adapters", "LoadAdapter", request, AdapterLoad.from_proto), timeout, metadata)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Stop new requests for the adapter at once; returns when its running requests finished and it is gone."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return self._unary(Call("adapters", "UnloadAdapter", request, _nothing), timeout, metadata)

    def list_adapters(self, *, timeout: float | None = None, metadata: Metadata = ()) -> AdapterList:
        call = Call("adapters", "ListAdapters", pb.ListAdaptersRequest(), AdapterList.from_proto)
        return self._unary(call, timeout, metadata)

    # ---- CollectionService -------------------------------------------------------------------------------------------

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
        return self._unary(Call("collections", "UpsertDocuments", request, UpsertResult.from_proto), timeout, metadata)

    def delete_documents(
        self, collection: str, document_ids: Sequence[str], *, timeout: float | None = None, metadata: Metadata = ()
    ) -> DeleteResult:
        request = pb.DeleteDocumentsRequest(collection=collection, document_ids=list(document_ids))
        return self._unary(Call("collections", "DeleteDocuments", request, DeleteResult.from_proto), timeout, metadata)

    def list_collections(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[CollectionInfo]:
        def parse(response: pb.ListCollectionsResponse) -> list[CollectionInfo]:
            return [CollectionInfo.from_proto(c) for c in response.collections]

        return self._unary(
            Call("collections", "ListCollections", pb.ListCollectionsRequest(), parse), timeout, metadata
        )

    def delete_collection(self, name: str, *, timeout: float | None = None, metadata: Metadata = ()) -> None:
        request = pb.DeleteCollectionRequest(name=name)
        return self._unary(Call("collections", "DeleteCollection", request, _nothing), timeout, metadata)

    # ---- grpc.health.v1 ------------------------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status, "SERVING" or "NOT_SERVING"; an unknown service raises NOT_FOUND."""

        def parse(response: health_pb2.HealthCheckResponse) -> str:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

        request = health_pb2.HealthCheckRequest(service=service)
        return self._unary(Call("health", "Check", request, parse), timeout, ())


class Client(_Calls):
    """A blocking client. `credentials` (see tls_credentials) connect over TLS; `token` is sent as a bearer token."""

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
        self._stubs = self._stubs_for(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, call: Call[T], timeout: float | None, metadata: Metadata) -> T:
        try:
            return call.parse(self._method(call)(call.request, **self._options(timeout, metadata)))
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None

    def _streaming(self, call: Call[T], timeout: float | None, metadata: Metadata) -> Iterator[T]:
        responses = self._method(call)(call.request, **self._options(timeout, metadata))
        try:
            for response in responses:
                yield call.parse(response)
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None
        finally:
            responses.cancel()


class AsyncClient(_Calls):
    """The asyncio client: Client's methods, each awaited (`stream` is an async iterator)."""

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
        self._stubs = self._stubs_for(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, call: Call[T], timeout: float | None, metadata: Metadata) -> T:  # type: ignore[override]
        try:
            return call.parse(await self._method(call)(call.request, **self._options(timeout, metadata)))
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None

    async def _streaming(  # type: ignore[override]
        self, call: Call[T], timeout: float | None, metadata: Metadata
    ) -> AsyncIterator[T]:
        responses = self._method(call)(call.request, **self._options(timeout, metadata))
        try:
            async for response in responses:
                yield call.parse(response)
        except grpc.RpcError as error:
            raise LoraserveRpcError.from_grpc(error) from None
        finally:
            responses.cancel()
