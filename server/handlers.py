"""Wrapping a gRPC method handler so that something runs first (a check that may abort the call) and something runs
when it ends, whatever its kind: the one place the interceptors build handlers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

Check = Callable[[Any, grpc.ServicerContext], None]  # (request, context); aborts the call to refuse it


def wrapped(
    handler: Any,
    check: Check,
    deserializer: Callable[[bytes], Any] | None = None,
    done: Callable[[], None] | None = None,
) -> Any:
    """The same handler with `check` before its behaviour and `done` after it (a stream: when its iterator ends or
    is closed), and `deserializer` in place of its own when given (for single requests only: a client-streaming
    call's check sees its request iterator, parsed as the handler parses it)."""

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                check(request, context)
                return behaviour(request, context)
            finally:
                if done is not None:
                    done()

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                check(request, context)
                yield from behaviour(request, context)
            finally:
                if done is not None:
                    done()

        return run

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, unary, True),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, unary, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming, False),
    )
    for attribute, make, wrap, single_request in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            parse = (deserializer if single_request else None) or handler.request_deserializer
            return make(wrap(behaviour), parse, handler.response_serializer)
    return handler
