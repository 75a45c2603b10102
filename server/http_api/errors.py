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


def internal(request_id: str) -> ApiError:
    return ApiError(500, f"internal error (request id {request_id}; the server log has details)", "server_error")
