"""The resident LoRA adapters: which exist, how many requests use each, and the loads and unloads waiting for the
engine thread (only it may change what the model runs). Thread-safe.

Loading past --max-adapters unloads the least recently used idle adapter first. Unloading stops new requests for the
adapter at once and completes when the last request using it has finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from loraserve.errors import AdapterNotFound, AlreadyExists, InvalidRequest, LoraserveError, ModelFailure, QueueFull
from loraserve.server.models.adapters.spec import AdapterInfo, adapter_id_rule, is_valid_adapter_id

if TYPE_CHECKING:
    from loraserve.server.models.adapters.files import LoraAdapter

logger = logging.getLogger(__name__)


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

    def apply_pending(self, rebuild: Callable[[list[LoraAdapter]], None]) -> None:
        """Carry out the unloads whose adapters are idle, then the loads one by one, calling rebuild(resident) with
        each new resident set (the engine builds its LoRA banks there). A load whose rebuild raises is undone and
        fails with the error, mapped to its status by load_error; the adapters already resident stay."""
        done: list[tuple[Future, object]] = []
        with self._lock:
            unloaded = self._finish_unloads(done)
            loads, self._loads = self._loads, []
        if unloaded:
            self._rebuild_after_unload(rebuild)
        for adapter, future in loads:
            if future.set_running_or_notify_cancel():  # False: its caller's deadline passed and it gave up
                done.append((future, self._load(adapter, rebuild)))
        for future, outcome in done:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _rebuild_after_unload(self, rebuild: Callable[[list[LoraAdapter]], None]) -> None:
        """Smaller banks without the unloaded adapters. If that fails, the old banks stay: the registry no longer
        hands out the unloaded ids, so their rows are only unused memory until the next change."""
        try:
            rebuild(self.resident())
        except Exception as error:
            logger.error("rebuilding the LoRA banks after an unload failed; the old banks stay", exc_info=error)

    def _load(self, adapter: LoraAdapter, rebuild: Callable[[list[LoraAdapter]], None]) -> LoadOutcome | Exception:
        with self._lock:
            try:
                evicted = self._make_room()
            except QueueFull as error:
                return error
            for victim in evicted:
                self._resident[victim].unloading = True  # no new requests while the banks are rebuilt
            candidate = [r.adapter for i, r in self._resident.items() if i not in evicted] + [adapter]
        try:
            rebuild(candidate)
        except Exception as error:
            with self._lock:
                for victim in evicted:
                    self._resident[victim].unloading = False
            return load_error(adapter.info.id, error)
        with self._lock:
            for victim in evicted:
                del self._resident[victim]
            self._resident[adapter.info.id] = Resident(adapter)
        return LoadOutcome(adapter.info, evicted)

    def fail_pending(self, error: BaseException) -> None:
        """The engine stopped: end every waiting load and unload with `error`."""
        with self._lock:
            futures = [f for _, f in self._loads] + [f for _, f in self._unloads]
            self._loads, self._unloads = [], []
        for future in futures:
            if not future.cancelled():  # a load whose caller gave up at its deadline is cancelled already
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
        """The least recently used idle adapters to unload so that one more fits (lock held)."""
        idle = sorted((r.last_used, i) for i, r in self._resident.items() if r.active == 0 and not r.unloading)
        excess = len(self._resident) + 1 - self.max_adapters
        if excess <= 0:
            return ()
        if len(idle) < excess:
            raise QueueFull(
                f"all {self.max_adapters} resident adapters are in use (--max-adapters); retry when one is idle"
            )
        return tuple(i for _, i in idle[:excess])


def load_error(adapter_id: str, error: Exception) -> Exception:
    """The load's own status for an error raised while its LoRA banks were built."""
    if isinstance(error, LoraserveError):
        return error
    if isinstance(error, torch.OutOfMemoryError):
        return QueueFull(f"adapter {adapter_id!r} does not fit in the device's memory beside the resident ones")
    if isinstance(error, ValueError):  # e.g. a prompt format this tokenizer cannot render
        return InvalidRequest(f"adapter {adapter_id!r} cannot be served: {error}", "source")
    logger.error("loading an adapter failed", exc_info=error, extra={"adapter_id": adapter_id})
    return ModelFailure(f"adapter {adapter_id!r} could not be made resident (the server log has details)")
