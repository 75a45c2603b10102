"""Who may call what, and how often: bearer-token authentication (UNAUTHENTICATED), admin tokens for AdapterService
and the RPCs that change collections (PERMISSION_DENIED), and a token bucket per client (RESOURCE_EXHAUSTED with a
retry hint). Health, reflection and Ready stay open, so load balancers and grpcurl can probe without a token.

Also: a request whose bytes do not parse as its message (invalid UTF-8 in a string, a truncated field) is
INVALID_ARGUMENT. grpc itself would answer INTERNAL ("Exception deserializing request!") before any servicer runs."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from loraserve.config import ServerConfig
from loraserve.errors import ConfigError

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/loraserve.v1.InferenceService/Ready")
# Changing what the server holds: adapters, and the stored collections.
ADMIN_METHODS = (
    "/loraserve.v1.AdapterService/",
    "/loraserve.v1.CollectionService/UpsertDocuments",
    "/loraserve.v1.CollectionService/DeleteDocuments",
    "/loraserve.v1.CollectionService/DeleteCollection",
)
RETRY_AFTER_HEADER = "retry-after-ms"
MAX_CLIENTS_TRACKED = 10_000


def read_tokens(path: str, variable: str) -> tuple[str, ...]:
    """Tokens from a secret file (one per line) and from an environment variable (comma-separated)."""
    tokens: list[str] = []
    if path:
        try:
            tokens += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise ConfigError(f"cannot read the token file {path}: {error}") from None
    tokens += [t.strip() for t in os.environ.get(variable, "").split(",") if t.strip()]
    return tuple(tokens)


def _matches(token: str, known: tuple[str, ...]) -> bool:
    """Constant-time membership: every known token is compared, whatever matches first."""
    results = [hmac.compare_digest(token.encode(), candidate.encode()) for candidate in known]
    return any(results)


class TokenBucket:
    """`rate` requests per second per key, with bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_CLIENTS_TRACKED:
                self._buckets.popitem(last=False)
        return wait


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    message: str
    retry_after_s: float = 0.0


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks every call before its servicer runs."""

    def __init__(self, config: ServerConfig) -> None:
        self.admin_tokens = read_tokens(config.admin_tokens_file, "LORASERVE_ADMIN_TOKENS")
        self.tokens = read_tokens(config.auth_tokens_file, "LORASERVE_AUTH_TOKENS") + self.admin_tokens
        self.limiter = TokenBucket(config.rate_limit, config.rate_burst) if config.rate_limit else None

    @property
    def active(self) -> bool:
        return bool(self.tokens) or self.limiter is not None

    def check(self, method: str, metadata: dict[str, str], peer: str) -> Denial | None:
        """Why the call may not go on, or None."""
        header = metadata.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if self.tokens:
            if not token:
                return Denial(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a bearer token: send metadata 'authorization: Bearer <token>'",
                )
            if not _matches(token, self.tokens):
                return Denial(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid for this server")
        if method.startswith(ADMIN_METHODS) and self.admin_tokens and not _matches(token, self.admin_tokens):
            return Denial(grpc.StatusCode.PERMISSION_DENIED, f"{method.strip('/')} needs an admin token")
        if self.limiter is not None:
            key = hashlib.sha256(token.encode()).hexdigest() if token else peer.rsplit(":", 1)[0]
            wait = self.limiter.take(key)
            if wait:
                return Denial(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit of {self.limiter.rate:g} requests/s per client reached; retry in {wait:.2f} s",
                    wait,
                )
        return None

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not self.active or details.method.startswith(OPEN_PREFIXES):
            return handler
        return _guarded(handler, details.method, self)


def _guarded(handler: Any, method: str, interceptor: AccessInterceptor) -> Any:
    """The same handler, with the access check first (the check needs the call's context, for the peer)."""

    def admit(context: grpc.ServicerContext) -> None:
        denial = interceptor.check(method, dict(context.invocation_metadata() or ()), context.peer())
        if denial is not None:
            if denial.retry_after_s:
                context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(round(denial.retry_after_s * 1000))),))
            context.abort(denial.code, denial.message)

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            admit(context)
            return behaviour(request_or_iterator, context)

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            admit(context)
            yield from behaviour(request_or_iterator, context)

        return run

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming),
    )
    for attribute, make, wrap in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return make(wrap(behaviour), handler.request_deserializer, handler.response_serializer)
    return handler


@dataclass(frozen=True)
class Undecodable:
    """What a request's bytes became when they did not parse."""

    message: str
    error: Exception


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Parses requests itself, so that bytes that are not a valid message get INVALID_ARGUMENT naming the message."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _tolerant(handler)


def _tolerant(handler: Any) -> Any:
    deserialize = handler.request_deserializer
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message.full_name if message is not None else "request"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # protobuf's DecodeError, and the UTF-8 errors some runtimes raise instead
            return Undecodable(name, error)

    def refuse(request: Any, context: grpc.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {request.message} (check string fields for invalid UTF-8): "
                f"{request.error}",
            )

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            refuse(request, context)
            return behaviour(request, context)

        return run

    def streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            refuse(request, context)
            yield from behaviour(request, context)

        return run

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), parse, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), parse, handler.response_serializer)
    return handler  # client-streaming RPCs parse each message in their own loop; the contract has none
