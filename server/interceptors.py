"""Who may call what, and how often: one table classifies every RPC as open, read or admin; bearer-token
authentication (UNAUTHENTICATED), admin tokens (PERMISSION_DENIED), and a token bucket per client (RESOURCE_EXHAUSTED
with a retry hint). The HTTP API runs the same checks, so a client has one rate limit across both protocols.

Also: a request whose bytes do not parse as its message (invalid UTF-8 in a string, a truncated field) is
INVALID_ARGUMENT. grpc itself would answer INTERNAL ("Exception deserializing request!") before any servicer runs."""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from loraserve.config import ServerConfig
from loraserve.errors import ConfigError
from loraserve.server.handlers import wrapped


class Access(enum.Enum):
    """Who may call a method."""

    OPEN = "open"  # anyone: load balancers and grpcurl probe without a token
    READ = "read"  # a user's (or an admin's) token, when the server has tokens
    ADMIN = "admin"  # an admin token; a server with no admin tokens takes admin calls from loopback only


# Every method of every service the server registers (tests/server/test_security.py walks the generated descriptors
# and fails on one missing here). A method not in the table is ADMIN: a new RPC stays closed until classified.
METHOD_ACCESS: dict[str, Access] = {
    "/grpc.health.v1.Health/Check": Access.OPEN,
    "/grpc.health.v1.Health/List": Access.OPEN,
    "/grpc.health.v1.Health/Watch": Access.OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Access.OPEN,
    "/loraserve.v1.InferenceService/Ready": Access.OPEN,
    "/loraserve.v1.InferenceService/Generate": Access.READ,
    "/loraserve.v1.InferenceService/GenerateStream": Access.READ,
    "/loraserve.v1.InferenceService/RagQuery": Access.READ,
    "/loraserve.v1.InferenceService/ModelInfo": Access.READ,
    "/loraserve.v1.InferenceService/Tokenize": Access.READ,
    "/loraserve.v1.CollectionService/ListCollections": Access.READ,
    # Changing what the server holds, or listing where its adapters come from: adapters, and the stored collections.
    "/loraserve.v1.AdapterService/LoadAdapter": Access.ADMIN,
    "/loraserve.v1.AdapterService/UnloadAdapter": Access.ADMIN,
    "/loraserve.v1.AdapterService/ListAdapters": Access.ADMIN,
    "/loraserve.v1.CollectionService/UpsertDocuments": Access.ADMIN,
    "/loraserve.v1.CollectionService/DeleteDocuments": Access.ADMIN,
    "/loraserve.v1.CollectionService/DeleteCollection": Access.ADMIN,
}
RETRY_AFTER_HEADER = "retry-after-ms"
MAX_CLIENTS_TRACKED = 10_000
IPV6_CLIENT_PREFIX = 64  # one host, or one customer of an ISP, usually holds a whole /64


def access_of(method: str) -> Access:
    """A method's class; ADMIN for one the table does not name (deny by default)."""
    return METHOD_ACCESS.get(method, Access.ADMIN)


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


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _matches(token: str, known: tuple[bytes, ...]) -> bool:
    """Constant-time membership in `known` (tokens' digests): fixed-length digests are compared, so the time says
    nothing of a token's length (compare_digest returns at once on unequal lengths), and every one is compared,
    whatever matches first."""
    digest = _digest(token)
    results = [hmac.compare_digest(digest, candidate) for candidate in known]
    return any(results)


def client_address(peer: str) -> str:
    """The caller's IP address, written the same way for both protocols: gRPC names a peer `ipv4:127.0.0.1:1234` or
    `ipv6:[::1]:1234` (the brackets sometimes percent-encoded), the HTTP API passes the bare address. An IPv4-mapped
    IPv6 address (a dual-stack socket's IPv4 client) is its IPv4 address. Anything else (a unix socket) stays as it
    is."""
    text = unquote(peer)
    scheme, _, rest = text.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if scheme in ("ipv4", "ipv6") else text
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def is_loopback(peer: str) -> bool:
    """127.0.0.0/8 or ::1."""
    try:
        return ipaddress.ip_address(client_address(peer)).is_loopback
    except ValueError:
        return False


def _address_key(peer: str) -> str:
    """The rate-limit key of a caller without an authenticated token: its IP address, or its /64 for IPv6 (one host
    can use a whole /64, and would otherwise be 2**64 clients, each with a fresh bucket)."""
    address = client_address(peer)
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return f"peer:{address}"
    if parsed.version == 6:
        return f"address:{ipaddress.ip_network(f'{parsed}/{IPV6_CLIENT_PREFIX}', strict=False)}"
    return f"address:{parsed}"


@dataclass(frozen=True)
class Throttled:
    """Why a request must wait, and how long."""

    wait_s: float
    crowded: bool = False  # a new client while the server is flooded with distinct clients: it starts with no burst


class TokenBucket:
    """`rate` requests per second per key, with bursts of up to `burst`, for at most `capacity` keys.

    A flood of new keys must neither reset anyone's bucket nor lock newcomers out. When the table is full, the least
    recently used bucket is forgotten, whatever it holds; if it had not refilled to the burst yet (the server is being
    flooded with distinct clients), the new key starts with an empty bucket instead of a full one. So a key that comes
    back after being forgotten never gains: it starts no better off than its debt, with no burst. A newcomer during a
    flood waits 1/rate seconds for its first request instead of being refused for as long as the flood lasts. IPv6
    clients keyed by their /64 (see _address_key) make such a flood take many hosts, not one."""

    def __init__(
        self, rate: float, burst: int, capacity: int = MAX_CLIENTS_TRACKED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at); oldest use first
        self._lock = threading.Lock()

    def take(self, key: str) -> Throttled | None:
        """None when the request may go (it takes a token), else how long until it could."""
        now = self._clock()
        with self._lock:
            known = self._buckets.pop(key, None)
            if known is None:
                flooded = self._make_room(now)
                tokens = 0.0 if flooded else float(self.burst)
            else:
                tokens = self._refilled(known, now)
                flooded = False
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
        return Throttled(wait, crowded=flooded) if wait else None

    def _refilled(self, bucket: tuple[float, float], now: float) -> float:
        tokens, at = bucket
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def _make_room(self, now: float) -> bool:
        """Forget least recently used buckets until a new key fits; True when one of them still held a debt."""
        flooded = False
        while len(self._buckets) >= self.capacity:
            _, bucket = self._buckets.popitem(last=False)
            flooded |= self._refilled(bucket, now) < self.burst
        return flooded


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    message: str
    retry_after_s: float = 0.0


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks every call that is not OPEN before its servicer runs."""

    def __init__(self, config: ServerConfig) -> None:
        admin_tokens = read_tokens(config.admin_tokens_file, "LORASERVE_ADMIN_TOKENS")
        tokens = read_tokens(config.auth_tokens_file, "LORASERVE_AUTH_TOKENS") + admin_tokens
        self._admin_digests = tuple(_digest(t) for t in admin_tokens)
        self._digests = tuple(_digest(t) for t in tokens)
        self.limiter = (
            TokenBucket(config.rate_limit, config.rate_burst, MAX_CLIENTS_TRACKED) if config.rate_limit else None
        )

    @property
    def active(self) -> bool:
        """Whether a READ call has anything to be checked against."""
        return bool(self._digests) or self.limiter is not None

    def check(self, method: str, metadata: dict[str, str], peer: str, access: Access | None = None) -> Denial | None:
        """Why the call may not go on, or None. `access` defaults to the method's class in METHOD_ACCESS; `peer` is
        gRPC's peer string or a bare IP address."""
        access = access or access_of(method)
        if access is Access.OPEN:
            return None
        header = metadata.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if self._digests:
            if not token:
                return Denial(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a bearer token: send metadata 'authorization: Bearer <token>'",
                )
            if not _matches(token, self._digests):
                return Denial(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid for this server")
        if access is Access.ADMIN:
            denial = self._admin_denial(method.strip("/"), token, peer)
            if denial is not None:
                return denial
        if self.limiter is not None:
            # By token only when it is one of the server's own (a made-up token would be a fresh bucket); else by
            # address, the same for gRPC and HTTP.
            key = f"token:{_digest(token).hex()}" if self._digests else _address_key(peer)
            throttled = self.limiter.take(key)
            if throttled is not None:
                message = _throttle_message(self.limiter, throttled)
                return Denial(grpc.StatusCode.RESOURCE_EXHAUSTED, message, throttled.wait_s)
        return None

    def _admin_denial(self, method: str, token: str, peer: str) -> Denial | None:
        if self._admin_digests:
            if _matches(token, self._admin_digests):
                return None
            return Denial(grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin token")
        if is_loopback(peer):  # no admin tokens: the machine's own users only
            return None
        return Denial(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is an admin call, and this server has no admin tokens: it takes admin calls from loopback "
            "only. Configure --admin-tokens-file or LORASERVE_ADMIN_TOKENS to call it from elsewhere",
        )

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        access = access_of(details.method)
        if handler is None or access is Access.OPEN or (access is Access.READ and not self.active):
            return handler
        return _guarded(handler, details.method, self)


def _throttle_message(limiter: TokenBucket, throttled: Throttled) -> str:
    if throttled.crowded:
        return (
            f"too many clients at once (more than the {limiter.capacity} whose rate limits the server tracks): a new "
            f"client starts without a burst; retry in {throttled.wait_s:.2f} s"
        )
    return f"rate limit of {limiter.rate:g} requests/s per client reached; retry in {throttled.wait_s:.2f} s"


def _guarded(handler: Any, method: str, interceptor: AccessInterceptor) -> Any:
    """The same handler, with the access check first (the check needs the call's context, for the peer)."""

    def admit(request: Any, context: grpc.ServicerContext) -> None:
        denial = interceptor.check(method, dict(context.invocation_metadata() or ()), context.peer())
        if denial is not None:
            if denial.retry_after_s:
                context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(round(denial.retry_after_s * 1000))),))
            context.abort(denial.code, denial.message)

    return wrapped(handler, admit)


@dataclass(frozen=True)
class Undecodable:
    """What a request's bytes became when they did not parse."""

    message: str
    error: Exception


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Parses requests itself, so that bytes that are not a valid message get INVALID_ARGUMENT naming the message."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        # grpc's own services (health, reflection) are left as they are: Watch's non-blocking form must survive.
        if handler is None or handler.request_deserializer is None or not details.method.startswith("/loraserve."):
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

    return wrapped(handler, refuse, deserializer=parse)
