"""The channel between the engine thread and whoever serves one request: the engine puts chunks (or an error), the
reader takes them, on an RPC thread (iterating) or on an asyncio loop (told by a callback that something arrived).

What the reader has not taken yet is coalesced into one chunk, the way vLLM's RequestOutputCollector does: a client
that reads slowly, or not at all, gets the same text in fewer, larger chunks, and what waits for it is at most its
output so far, never a chunk object per token."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from loraserve.errors import Unavailable
from loraserve.server.engine.outputs import GenerationChunk, GenerationResult

# How often a waiting reader checks that the engine is still alive (it fails every stream when it stops, so this is
# a safety net, not the mechanism).
_LIVENESS_POLL_S = 1.0

Item = GenerationChunk | BaseException


class RequestStream:
    """Iterate for chunks until the finished one; an error the engine put is raised instead."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], engine_alive: Callable[[], bool]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._engine_alive = engine_alive
        self._backlog: deque[Item] = deque()
        self._arrived = threading.Condition()
        self._on_put: Callable[[], None] | None = None

    def put(self, item: Item) -> None:
        """From the engine thread: a chunk, merged into the one still waiting for the reader if there is one."""
        with self._arrived:
            last = self._backlog[-1] if self._backlog else None
            if isinstance(item, GenerationChunk) and isinstance(last, GenerationChunk):
                self._backlog[-1] = last.followed_by(item)
            else:
                self._backlog.append(item)
            self._arrived.notify()
            on_put = self._on_put
        if on_put is not None:
            on_put()

    def notify(self, on_put: Callable[[], None]) -> None:
        """Call `on_put` (on the engine's thread: it must be quick and must not raise) whenever something arrives,
        and once now if something already has; the reader then takes it with take_nowait."""
        with self._arrived:
            self._on_put = on_put
            pending = bool(self._backlog)
        if pending:
            on_put()

    def take_nowait(self) -> Item | None:
        with self._arrived:
            return self._backlog.popleft() if self._backlog else None

    def cancel(self) -> None:
        self._cancel(self.request_id)

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            item = self._take()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def result(self) -> GenerationResult:
        """Wait for the whole completion."""
        return GenerationResult.from_chunks(self)

    def _take(self) -> Item:
        with self._arrived:
            while not self._backlog:
                started = time.monotonic()
                self._arrived.wait(_LIVENESS_POLL_S)
                if not self._backlog and time.monotonic() - started >= _LIVENESS_POLL_S and not self._engine_alive():
                    return Unavailable("the engine stopped before this request finished")
            return self._backlog.popleft()
