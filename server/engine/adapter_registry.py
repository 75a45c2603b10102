"""The resident LoRA adapters: which exist, how many requests use each, and the loads and unloads waiting for the
engine thread (only it may change what the model runs). Thread-safe.

Loading past --max-adapters unloads the least recently used idle adapter first. Unloading stops new requests for the
adapter at once and completes when the last request using it has finished.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from loraserve.errors import AdapterNotFound, AlreadyExists, InvalidRequest, QueueFull
from loraserve.server.models.adapters import AdapterInfo, adapter_id_rule, is_valid_adapter_id

if TYPE_CHECKING:
    from loraserve.server.models.lora import LoraAdapter


@dataclass
class Resident:
    adapter: LoraAdapter
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    unloading: bool = False


@dataclass(frozen=True)
class LoadOutcome:
    info: AdapterInfo
    evicted: tuple[str, ...]


class AdapterRegistry:
    """Resident adapters in load order (their index is their block in the LoRA banks)."""

    def __init__(self, adapters: list[LoraAdapter], max_adapters: int, engine_wakeup: threading.Condition) -> None:
        self.max_adapters = max_adapters
        self._resident = {a.info.id: Resident(a) for a in adapters}
        self._loads: list[tuple[LoraAdapter, Future[LoadOutcome]]] = []
        self._unloads: list[tuple[str, Future[str]]] = []
        self._lock = threading.Lock()
        self._engine_wakeup = engine_wakeup  # the engine waits on it for work; this registry only notifies it

    def _wake(self) -> None:
        with self._engine_wakeup:
            self._engine_wakeup.notify_all()

    # ---- requests ----------------------------------------------------------------------------------------------

    def resolve(self, adapter_id: str) -> str:
        """The adapter to use ("" for the base model); raises for a malformed, unknown or departing id."""
        if not adapter_id:
            return ""
        if not is_valid_adapter_id(adapter_id):
            raise InvalidRequest(f"{adapter_id!r} is not a valid adapter id: use {adapter_id_rule()}", "adapter_id")
        with self._lock:
            resident = self._resident.get(adapter_id)
            if resident is None or resident.unloading:
                raise AdapterNotFound(adapter_id, [i for i, r in self._resident.items() if not r.unloading])
        return adapter_id

    def acquire(self, adapter_id: str) -> None:
        """A request starts using the adapter (raises if it has gone or is going meanwhile)."""
        if adapter_id:
            with self._lock:
                resident = self._resident.get(adapter_id)
                if resident is None or resident.unloading:
                    raise AdapterNotFound(adapter_id, [i for i, r in self._resident.items() if not r.unloading])
                resident.active += 1
                resident.last_used = time.monotonic()

    def release(self, adapter_id: str) -> None:
        """A request using the adapter has finished."""
        if adapter_id:
            with self._lock:
                resident = self._resident.get(adapter_id)
                if resident is not None:
                    resident.active -= 1
            self._wake()

    # ---- administration (any thread) ---------------------------------------------------------------------------

    def request_load(self, adapter: LoraAdapter) -> Future[LoadOutcome]:
        future: Future[LoadOutcome] = Future()
        with self._lock:
            if adapter.info.id in self._resident or any(a.info.id == adapter.info.id for a, _ in self._loads):
                raise AlreadyExists(f"adapter_id: {adapter.info.id!r} is already loaded; unload it first")
            self._loads.append((adapter, future))
        self._wake()
        return future

    def request_unload(self, adapter_id: str) -> Future[str]:
        future: Future[str] = Future()
        with self._lock:
            resident = self._resident.get(adapter_id)
            if resident is None or resident.unloading:
                raise AdapterNotFound(adapter_id, [i for i, r in self._resident.items() if not r.unloading])
            resident.unloading = True  # no new requests from now on
            self._unloads.append((adapter_id, future))
        self._wake()
        return future

    def infos(self) -> list[AdapterInfo]:
        """Resident adapters, most recently used first, with their current use."""
        with self._lock:
            ordered = sorted(self._resident.values(), key=lambda r: -r.last_used)
            return [replace(r.adapter.info, active_requests=r.active) for r in ordered if not r.unloading]

    # ---- the engine thread -------------------------------------------------------------------------------------

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._loads) or any(self._resident[i].active == 0 for i, _ in self._unloads)

    def resident(self) -> list[LoraAdapter]:
        with self._lock:
            return [r.adapter for r in self._resident.values()]

    def apply_pending(self) -> bool:
        """Carry out the loads and the unloads whose adapters are idle; True when the resident set changed."""
        done: list[tuple[Future, object]] = []
        with self._lock:
            changed = self._finish_unloads(done)
            for adapter, future in self._loads:
                try:
                    evicted = self._make_room()
                except QueueFull as error:
                    done.append((future, error))
                    continue
                self._resident[adapter.info.id] = Resident(adapter)
                done.append((future, LoadOutcome(adapter.info, evicted)))
                changed = True
            self._loads = []
        for future, outcome in done:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        return changed

    def fail_pending(self, error: BaseException) -> None:
        """The engine stopped: end every waiting load and unload with `error`."""
        with self._lock:
            futures = [f for _, f in self._loads] + [f for _, f in self._unloads]
            self._loads, self._unloads = [], []
        for future in futures:
            future.set_exception(error)

    def _finish_unloads(self, done: list[tuple[Future, object]]) -> bool:
        waiting = []
        for adapter_id, future in self._unloads:
            if self._resident[adapter_id].active == 0:
                del self._resident[adapter_id]
                done.append((future, adapter_id))
            else:
                waiting.append((adapter_id, future))
        changed = len(waiting) < len(self._unloads)
        self._unloads = waiting
        return changed

    def _make_room(self) -> tuple[str, ...]:
        """Unload least recently used idle adapters until one more fits (lock held)."""
        evicted: list[str] = []
        while len(self._resident) >= self.max_adapters:
            idle = [(r.last_used, i) for i, r in self._resident.items() if r.active == 0 and not r.unloading]
            if not idle:
                raise QueueFull(
                    f"all {self.max_adapters} resident adapters are in use (--max-adapters); retry when one is idle"
                )
            _, victim = min(idle)
            del self._resident[victim]
            evicted.append(victim)
        return tuple(evicted)
