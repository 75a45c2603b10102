"""Errors in OpenAI's shape, with HTTP codes taken from the gRPC side's one status table: an error gets the same
meaning over both protocols (loraserve.server.status maps it to a gRPC code, this maps that code to HTTP)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from loraserve.errors import InvalidRequest, ModelNotFound
from loraserve.server.status import status_for

# gRPC code -> (HTTP status, OpenAI error type)
HTTP_BY_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.CANCELLED: (503, "service_unavailable_error"),  # the server shut down mid-request
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.DATA_LOSS: (500, "server_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}
QUEUE_FULL_RETRY_AFTER_S = 1  # a full queue drains in about a step or two


@dataclass(frozen=True)
class ApiError:
    """One error response: HTTP status, body and headers."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float = 0.0
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL  # the same error's gRPC status, for the metrics

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))} if self.retry_after_s else {}


def from_status(
    grpc_code: grpc.StatusCode,
    message: str,
    retry_after_s: float = 0.0,
    param: str | None = None,
    code: str | None = None,
) -> ApiError:
    """The response for a gRPC status; `code` (OpenAI's machine-readable code) defaults to the status name."""
    status, kind = HTTP_BY_STATUS.get(grpc_code, (500, "server_error"))
    label = code or grpc_code.name.lower()
    return ApiError(status, message, kind, param, label, retry_after_s=retry_after_s, grpc_code=grpc_code)


def from_error(error: BaseException) -> ApiError | None:
    """The response for a domain error; None for anything unexpected (the caller logs it and answers 500)."""
    code = status_for(error)
    if code is None:
        return None
    param = error.field if isinstance(error, InvalidRequest) else None
    if isinstance(error, ModelNotFound):
        return from_status(code, str(error), param="model", code="model_not_found")
    retry = QUEUE_FULL_RETRY_AFTER_S if code is grpc.StatusCode.RESOURCE_EXHAUSTED else 0.0
    return from_status(code, str(error), retry_after_s=retry, param=param)


def _body_error(status: int, message: str, code: str, grpc_code: grpc.StatusCode) -> ApiError:
    """A refused body: HTTP's own statuses for it (413, 408, 400), with the gRPC code the metrics record."""
    return ApiError(status, message, "invalid_request_error", code=code, grpc_code=grpc_code)


def body_too_large(limit: int, declared: int | None = None) -> ApiError:
    """A body over --max-message-bytes: by its Content-Length, or counted as it arrived (chunked)."""
    size = f"is {declared} bytes" if declared is not None else f"passed {limit} bytes"
    message = f"the body {size}; at most {limit} are allowed (the server's --max-message-bytes)"
    return _body_error(413, message, "request_too_large", grpc.StatusCode.RESOURCE_EXHAUSTED)


def bad_content_length(message: str) -> ApiError:
    """A Content-Length header that is not one non-negative number, or that the body does not match."""
    return _body_error(400, message, "invalid_content_length", grpc.StatusCode.INVALID_ARGUMENT)


def body_stalled(seconds: float) -> ApiError:
    """A client that stopped sending its body: it holds a connection and a partial body for nothing."""
    message = f"no part of the body arrived for {seconds:g} s (the server's --client-stall-timeout); send it whole"
    return _body_error(408, message, "request_timeout", grpc.StatusCode.DEADLINE_EXCEEDED)


def internal(request_id: str) -> ApiError:
    return ApiError(500, f"internal error (request id {request_id}; the server log has details)", "server_error")
