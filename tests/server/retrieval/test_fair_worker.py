"""The embedding thread's fair share: jobs take turns a step at a time, so a short job never waits for a long one to
finish; a job past its deadline, or whose caller has gone, is dropped between two steps."""

from __future__ import annotations

import threading
import time

import pytest

from loraserve.errors import Cancelled, DeadlineExceeded
from loraserve.server.retrieval.fair_worker import Budget, FairWorker, Steps
from tests.conftest import HANG_GUARD_S


def counted(
    name: str,
    steps: int,
    log: list[str],
    first_step: threading.Event | None = None,
    go_on: threading.Event | None = None,
) -> Steps[str]:
    """`steps` steps logged as name0, name1, ...; with events: the first step says it has started, then waits."""
    for i in range(steps):
        log.append(f"{name}{i}")
        if first_step is not None and go_on is not None and i == 0:
            first_step.set()
            assert go_on.wait(HANG_GUARD_S), "hang guard: the short job never got in line"
        yield
    return name


def test_a_short_job_runs_between_the_steps_of_a_long_one() -> None:
    worker = FairWorker("test-embed")
    log: list[str] = []
    started, queued_behind = threading.Event(), threading.Event()
    long_result: list[str] = []
    long_steps = counted("L", 50, log, started, queued_behind)
    long_job = threading.Thread(target=lambda: long_result.append(worker.run(long_steps)))
    long_job.start()
    assert started.wait(HANG_GUARD_S)
    short: list[str] = []
    short_job = threading.Thread(target=lambda: short.append(worker.run(counted("S", 1, log))))
    short_job.start()
    end = time.monotonic() + HANG_GUARD_S
    while not worker._jobs:  # the long job is in its first step, so the short one is the only one in line
        assert time.monotonic() < end, "hang guard: the short job never got in line"
        time.sleep(0.001)
    queued_behind.set()
    short_job.join(HANG_GUARD_S)
    assert short == ["S"]
    long_job.join(HANG_GUARD_S)
    worker.close()
    assert long_result == ["L"]
    assert log[:3] == ["L0", "S0", "L1"]  # the short job ran right after the long one's step in progress
    assert log[-1] == "L49"


def test_a_job_past_its_deadline_is_dropped_between_steps() -> None:
    worker = FairWorker("test-embed")
    log: list[str] = []
    with pytest.raises(DeadlineExceeded):
        worker.run(counted("D", 3, log), Budget(deadline=time.monotonic() - 1))
    assert log == []
    worker.close()


def test_a_job_whose_caller_left_is_dropped_between_steps() -> None:
    worker = FairWorker("test-embed")
    log: list[str] = []
    with pytest.raises(Cancelled):
        worker.run(counted("A", 10, log), Budget(abandoned=lambda: len(log) >= 2))
    assert log == ["A0", "A1"]
    worker.close()


def test_an_error_in_a_job_is_its_callers_and_the_worker_goes_on() -> None:
    worker = FairWorker("test-embed")

    def broken() -> Steps[None]:
        yield
        raise ValueError("a bad batch")

    with pytest.raises(ValueError, match="a bad batch"):
        worker.run(broken())
    assert worker.call(lambda: 42) == 42
    worker.close()
