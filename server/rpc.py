"""The per-RPC wrapper: one decorator gives each call a request id (sent as x-request-id), times it for telemetry,
and ends every failure with the status from server/status.py's table; never UNKNOWN, never a stack trace."""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from loraserve.server.status import CORRELATION_ID_HEADER, REQUEST_ID_HEADER, status_for

logger = logging.getLogger(__name__)


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
