"""The embedding model's one thread, shared fairly. Every call is a job made of steps (a generator that yields after
each batch), and the thread runs one step of each waiting job in turn: a request with megabytes of documents shares
the model with a one-line question instead of making it wait for minutes. A job whose deadline has passed, or whose
caller has gone, is dropped between two steps."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loraserve.errors import Cancelled, DeadlineExceeded

T = TypeVar("T")
Steps = Generator[None, None, T]


def _present() -> bool:
    return False


@dataclass(frozen=True)
class Budget:
    """What bounds one request's jobs: its deadline (time.monotonic(), None for none), and whether its caller has
    gone."""

    deadline: float | None = None
    abandoned: Callable[[], bool] = _present


UNBOUNDED = Budget()  # no deadline, a caller that never leaves


@dataclass
class _Job:
    steps: Steps[Any]
    budget: Budget
    future: Future[Any] = field(default_factory=Future)


class FairWorker:
    """One thread running jobs round-robin, a step at a time. `run` waits for a job's result (or its error)."""

    def __init__(self, name: str) -> None:
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, steps: Steps[T], budget: Budget = UNBOUNDED) -> T:
        job = _Job(steps, budget)
        with self._ready:
            if self._closed:
                raise Cancelled("the server is shutting down")
            self._jobs.append(job)
            self._ready.notify()
        return job.future.result()

    def call(self, work: Callable[[], T]) -> T:
        """`work` as a job of one step."""

        def steps() -> Steps[T]:
            return work()
            yield  # makes this a generator

        return self.run(steps())

    def close(self) -> None:
        """Finish the step in progress, fail the waiting jobs, and end the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            deadline = job.budget.deadline
            if deadline is not None and time.monotonic() >= deadline:
                job.future.set_exception(DeadlineExceeded("the request's deadline passed before its embeddings were"))
                continue
            try:
                if job.budget.abandoned():
                    job.future.set_exception(Cancelled("the caller went away"))
                    continue
                next(job.steps)
            except StopIteration as finished:
                job.future.set_result(finished.value)
                continue
            except BaseException as error:  # the caller's to handle: it is raised from run()
                job.future.set_exception(error)
                continue
            with self._ready:
                self._jobs.append(job)  # to the back of the line: the others get their turn first

    def _next(self) -> _Job | None:
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if self._closed:
                for job in self._jobs:
                    job.future.set_exception(Cancelled("the server shut down before the embeddings were done"))
                self._jobs.clear()
                return None
            return self._jobs.popleft()
