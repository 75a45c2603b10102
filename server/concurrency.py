"""How many calls run at once: at most --grpc-workers calls other than probes, the next one refused at once with
RESOURCE_EXHAUSTED; and at most PROBE_STREAMS of the probes that stream (health Watch, reflection), which need no
token. The thread pool holds SPARE_THREADS more than the first limit, so health checks and Ready always find a
thread, however many streams clients hold open without reading (grpc's own maximum_concurrent_rpcs counted probes
too, and refused them first)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from loraserve.server.handlers import wrapped
from loraserve.server.interceptors import Access, access_of

SPARE_THREADS = 16
PROBE_STREAMS = SPARE_THREADS // 2  # the other half of the spare threads stays free for Check and Ready
BACKLOG_FACTOR = 4  # grpc's maximum_concurrent_rpcs, a backstop: this many times the threads
PROBE_STREAM_METHODS = (
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


class ConcurrencyLimit(grpc.ServerInterceptor):
    """Counts the calls in flight: probes apart, and the probes that stream on their own; a call over its limit is
    RESOURCE_EXHAUSTED before it starts."""

    def __init__(self, limit: int) -> None:
        self.calls = Slots(limit, "--grpc-workers")
        self.probe_streams = Slots(PROBE_STREAMS, "health Watch and reflection streams")

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return handler
        if details.method in PROBE_STREAM_METHODS:
            slots = self.probe_streams
        elif access_of(details.method) is Access.OPEN:
            return handler  # Check and Ready: quick, and never refused
        else:
            slots = self.calls
        held = threading.Event()  # set once this call holds a slot; released exactly once

        def admit(request: Any, context: grpc.ServicerContext) -> None:
            if not slots.take(held):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is serving {slots.limit} calls at once ({slots.name}); retry in a moment",
                )
            context.add_callback(release)  # a stream abandoned mid-way ends here, even if its iterator is never closed

        def release() -> None:
            slots.give_back(held)

        return wrapped(handler, admit, done=release)


class Slots:
    """A count of calls in flight, bounded by `limit`."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self.name = limit, name
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    def take(self, held: threading.Event) -> bool:
        with self._lock:
            if self._active >= self.limit:
                return False
            self._active += 1
            held.set()
            return True

    def give_back(self, held: threading.Event) -> None:
        with self._lock:
            if held.is_set():
                held.clear()
                self._active -= 1
