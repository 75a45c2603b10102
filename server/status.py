"""Errors to gRPC status codes: one table, one decorator. Every RPC gets a request id (sent as x-request-id), and
every failure a precise status with a message a person can act on; never UNKNOWN, never a stack trace."""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

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

logger = logging.getLogger(__name__)

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


def start_request(context: grpc.ServicerContext, rpc: str) -> str:
    """Give the call a request id, send it to the client, and log it next to the client's correlation id."""
    request_id = uuid.uuid4().hex
    context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
    metadata = dict(context.invocation_metadata() or ())
    logger.info(
        "request received",
        extra={
            "rpc": rpc,
            "request_id": request_id,
            "correlation_id": metadata.get(CORRELATION_ID_HEADER),
            "peer": context.peer(),
        },
    )
    return request_id


def abort(context: grpc.ServicerContext, error: Exception, request_id: str, rpc: str) -> None:
    """End the call with the error's status. Unexpected errors are logged with their traceback and reported as
    INTERNAL with the request id only."""
    code = status_for(error)
    fields = {"rpc": rpc, "request_id": request_id}
    if code is None:
        logger.error("unexpected error", exc_info=error, extra=fields)
        code = grpc.StatusCode.INTERNAL
        message = f"internal error (request id {request_id}; the server log has details)"
    else:
        logger.info("request refused", extra={**fields, "status": code.name, "reason": str(error)})
        message = str(error)
    context.abort(code, message)


class _Outcome:
    """Times one call and reports its status code to the servicer's telemetry, if it has any."""

    def __init__(self, servicer: Any, rpc: str) -> None:
        self.telemetry = getattr(servicer, "telemetry", None)
        self.rpc = rpc
        self.code = "OK"
        self.started = time.monotonic()

    def failed(self, code: grpc.StatusCode) -> None:
        self.code = code.name

    def report(self) -> None:
        if self.telemetry is not None:
            self.telemetry.rpc_finished(self.rpc, self.code, time.monotonic() - self.started)


def rpc_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method `(self, request, context, request_id)` as a gRPC handler `(self, request, context)`."""
    rpc = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            request_id, outcome = start_request(context, rpc), _Outcome(self, rpc)
            try:
                yield from method(self, request, context, request_id)
            except GeneratorExit:  # the client went away mid-stream
                outcome.failed(grpc.StatusCode.CANCELLED)
                raise
            except Exception as error:
                outcome.failed(status_for(error) or grpc.StatusCode.INTERNAL)
                abort(context, error, request_id, rpc)
            finally:
                outcome.report()

        return streaming

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        request_id, outcome = start_request(context, rpc), _Outcome(self, rpc)
        try:
            return method(self, request, context, request_id)
        except Exception as error:
            outcome.failed(status_for(error) or grpc.StatusCode.INTERNAL)
            abort(context, error, request_id, rpc)
        finally:
            outcome.report()

    return unary
