"""Errors to gRPC status codes: one table mapping each domain error to its status, and the request id headers.
Every failure gets a precise status with a message a person can act on; never UNKNOWN (server/rpc.py applies it)."""

from __future__ import annotations

import grpc

from loraserve.errors import (
    AdapterNotFound,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    LoraserveError,
    ModelFailure,
    NotFound,
    PermissionDenied,
    QueueFull,
    Unavailable,
)
from loraserve.storage import ArtifactCorrupted, ArtifactNotFound, StorageError, StorageFull, StorageUnavailable

REQUEST_ID_HEADER = "x-request-id"
CORRELATION_ID_HEADER = "x-correlation-id"

# The first matching class wins: subclasses come before their bases.
STATUS_BY_ERROR: dict[type[LoraserveError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Cancelled: grpc.StatusCode.CANCELLED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelFailure: grpc.StatusCode.INTERNAL,
    ArtifactNotFound: grpc.StatusCode.NOT_FOUND,
    ArtifactCorrupted: grpc.StatusCode.DATA_LOSS,
    StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: BaseException) -> grpc.StatusCode | None:
    """The status code for a domain error; None for anything unexpected."""
    for error_type, code in STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            return code
    return None
