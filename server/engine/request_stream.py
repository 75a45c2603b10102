"""The channel between the engine thread and the thread serving one request: the engine puts chunks (or an error),
the RPC thread iterates them; an asyncio server has them handed to a callback instead (`listen`), so that no thread
waits per request."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from loraserve.errors import Unavailable
from loraserve.server.engine.outputs import GenerationChunk, GenerationResult

# How often a waiting reader checks that the engine is still alive (it fails every stream when it stops, so this is
# a safety net, not the mechanism).
_LIVENESS_POLL_S = 1.0


class RequestStream:
    """Iterate for chunks until the finished one; an error the engine put is raised instead."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], engine_alive: Callable[[], bool]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._engine_alive = engine_alive
        self._queue: queue.SimpleQueue[GenerationChunk | BaseException] = queue.SimpleQueue()
        self._listener: Callable[[GenerationChunk | BaseException], None] | None = None
        self._lock = threading.Lock()

    def put(self, item: GenerationChunk | BaseException) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener(item)
            else:
                self._queue.put(item)

    def listen(self, listener: Callable[[GenerationChunk | BaseException], None]) -> None:
        """Hand every item to `listener` from now on, those already put first. It runs on the engine's thread: it
        must be quick and must not raise."""
        with self._lock:
            while True:
                try:
                    listener(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._listener = listener

    def cancel(self) -> None:
        self._cancel(self.request_id)

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            item = self._next()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def result(self) -> GenerationResult:
        """Wait for the whole completion."""
        return GenerationResult.from_chunks(self)

    def _next(self) -> GenerationChunk | BaseException:
        while True:
            try:
                return self._queue.get(timeout=_LIVENESS_POLL_S)
            except queue.Empty:
                if not self._engine_alive():
                    return Unavailable("the engine stopped before this request finished")
