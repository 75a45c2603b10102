"""Streams whose client has stopped reading: a send that cannot complete for --client-stall-timeout seconds is cancelled
(the engine request with it), so a reader that never reads holds no RPC thread, no batch row and no connection for
longer than that. One watchdog thread serves every stream; a stream only registers while gRPC is sending its next
message, which for a live client takes microseconds."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often the watchdog looks; a stall is noticed within timeout + POLL_S


class StallGuard:
    """Cancels a call whose send has waited longer than `timeout` seconds for its client to read."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.cancelled = 0  # calls cancelled so far
        self._sending: dict[int, tuple[float, str, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loraserve-stall-guard", daemon=True)
        self._thread.start()

    @contextmanager
    def sending(self, request_id: str, cancel: Callable[[], None]) -> Iterator[None]:
        """Around a generator's `yield` of one message: gRPC resumes the generator once the message is sent."""
        key = next(self._ids)
        with self._lock:
            self._sending[key] = (time.monotonic(), request_id, cancel)
        try:
            yield
        finally:
            with self._lock:
                self._sending.pop(key, None)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            now = time.monotonic()
            with self._lock:
                stalled = [(k, r, c) for k, (since, r, c) in self._sending.items() if now - since > self.timeout]
                for key, _, _ in stalled:
                    del self._sending[key]
                self.cancelled += len(stalled)
            for _, request_id, cancel in stalled:
                logger.warning(
                    "cancelled a stream whose client stopped reading",
                    extra={"request_id": request_id, "client_stall_timeout_s": self.timeout},
                )
                cancel()
