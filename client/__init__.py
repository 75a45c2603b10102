"""A typed gRPC client for every loraserve service (sync and asyncio); needs no torch."""

from loraserve.client.client import DEFAULT_TARGET, AsyncClient, Client
from loraserve.client.types import (
    AdapterInfo,
    AdapterList,
    AdapterLoad,
    CollectionInfo,
    DeleteResult,
    Generation,
    LoraserveRpcError,
    ModelInfo,
    RagAnswer,
    Source,
    StopReason,
    StreamChunk,
    Token,
    Tokenization,
    UpsertResult,
)

__all__ = [
    "DEFAULT_TARGET",
    "AdapterInfo",
    "AdapterList",
    "AdapterLoad",
    "AsyncClient",
    "Client",
    "CollectionInfo",
    "DeleteResult",
    "Generation",
    "LoraserveRpcError",
    "ModelInfo",
    "RagAnswer",
    "Source",
    "StopReason",
    "StreamChunk",
    "Token",
    "Tokenization",
    "UpsertResult",
]
