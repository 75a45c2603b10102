"""The engine: one thread owns the model and runs the batch; RPC threads submit requests and read their streams.

Each turn of the loop (continuous batching) admits waiting requests while the batch has room and the paged KV cache
has blocks for them (reusing cached prefix blocks), drops requests that were cancelled or ran out of time, and runs
one step: every decoding request feeds its last token, then prompts are fed in chunks within a token budget that keeps
running streams' inter-token latency bounded, all in one forward pass. A request joins at the next step and leaves the
moment it finishes, freeing its blocks. When a running request needs a block and none is left, the newest request is
preempted and recomputed later. The engine knows nothing of gRPC.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import Any

from loraserve.config import CHARS_PER_CONTEXT_TOKEN, EngineConfig
from loraserve.errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    LoraserveError,
    ModelFailure,
    QueueFull,
    Unavailable,
)
from loraserve.prompting import Message, load_prompt_format
from loraserve.server.engine.adapter_registry import AdapterRegistry, LoadOutcome
from loraserve.server.engine.block_manager import BASE_MODEL_IDENTITY, BlockManager, BlockTable
from loraserve.server.engine.constraints import ConstraintCompiler
from loraserve.server.engine.outputs import StopReason, TokenDetail
from loraserve.server.engine.params import GenerationRequest
from loraserve.server.engine.preparation import prepare
from loraserve.server.engine.request_stream import RequestStream
from loraserve.server.engine.sampling import SampledTokens, sample_next
from loraserve.server.engine.scheduler import Scheduler
from loraserve.server.engine.sequence import GenerationSequence, SequenceContext
from loraserve.server.engine.stats import EngineStats
from loraserve.server.engine.step_budget import StepBudget
from loraserve.server.engine.telemetry import Telemetry, wall_ns
from loraserve.server.engine.tokenization import InputLimits, Tokenization
from loraserve.server.models.adapters.files import LoraAdapter
from loraserve.server.models.adapters.spec import AdapterSpec
from loraserve.server.models.executor import ModelExecutor
from loraserve.server.models.loading import LoadedModel
from loraserve.server.models.types import RowWork

logger = logging.getLogger(__name__)


class ModelFault(Exception):
    """Steps kept failing: the model or its device is at fault, and the engine ends (its cause is the last error)."""


class EngineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Engine:
    """Batches requests onto one model. submit, cancel, stats and tokenize are safe to call from any thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        on_failure: Callable[[BaseException], None] | None = None,
        telemetry: Telemetry | None = None,
        log_prompts: bool = False,
    ) -> None:
        self.loaded = loaded
        self.telemetry = telemetry
        self.config = config
        if len(loaded.lora_adapters) > config.max_adapters:
            raise ConfigError(
                f"--adapter: {len(loaded.lora_adapters)} adapters, more than --max-adapters {config.max_adapters}"
            )
        self._cond = threading.Condition()
        self.adapters = AdapterRegistry(list(loaded.lora_adapters), config.max_adapters, self._cond)
        self.max_sequence_length = loaded.description.max_sequence_length
        self.max_input_chars = config.max_input_chars or CHARS_PER_CONTEXT_TOKEN * self.max_sequence_length
        limits = InputLimits(max_chars=self.max_input_chars, max_messages=self.max_sequence_length)
        self.tokenization = Tokenization(loaded.tokenizer, loaded.prompt_format, limits=limits)
        self.constraints = ConstraintCompiler(
            loaded.tokenizer, loaded.description.vocab_size, loaded.eos_token_ids, config.constraint_cache_size
        )
        self._on_failure = on_failure
        self.executor = ModelExecutor(loaded, config)
        self.blocks = BlockManager(self.executor.usable_blocks, self.executor.block_size, config.prefix_caching)
        self._waiting: deque[GenerationSequence] = deque()
        self._running: list[GenerationSequence] = []  # in admission order; each holds KV cache blocks
        self._adapter_index: dict[str, int] = {}
        self._adapter_identity: dict[str, bytes] = {}
        self._use_adapters(self.adapters.resident())
        budget = StepBudget(
            config.max_prefill_tokens,
            config.min_prefill_tokens,
            config.decode_latency_factor,
            config.prefill_burst_ratio,
        )
        self._scheduler = Scheduler(self.blocks, config.max_batch_size, budget)
        self._context = SequenceContext(
            tokenization=self.tokenization.private_copy(),  # decoding on the engine thread waits for no encode
            eos_token_ids=loaded.eos_token_ids,
            max_sequence_length=self.max_sequence_length,
            device=self.executor.device,
            log_prompts=log_prompts,
        )
        self._by_id: dict[str, GenerationSequence] = {}
        self._active = 0
        self._generated_tokens = 0
        self._completed = 0
        self._preemptions = 0
        self._failed_steps = 0  # in a row; a successful step resets it
        self._constrained_requests = 0
        self._mask_steps = 0
        self._mask_seconds = 0.0
        self._state = EngineState.CREATED
        self._started_at = time.monotonic()
        self._thread: threading.Thread | None = None
        if telemetry is not None:
            telemetry.watch("queue_depth", lambda: len(self._waiting))
            telemetry.watch("active_requests", lambda: self._active)
            telemetry.watch("kv_cache.used_ratio", lambda: self.blocks.usage().used_blocks / self.blocks.num_blocks)

    def _use_adapters(self, resident: list[LoraAdapter]) -> None:
        """Make `resident` the adapters the model runs: LoRA banks, prompt formats and adapter indices (engine
        thread). Everything is built before anything is replaced, so a failure leaves the running set as it was."""
        formats = {
            a.info.id: load_prompt_format(a.info.prompt_format, self.loaded.tokenizer)
            for a in resident
            if a.info.prompt_format
        }
        # Prefix cache blocks are keyed by the adapter's weights, never its id alone.
        identity = {a.info.id: bytes.fromhex(a.info.content_hash) for a in resident}
        self._adapter_index = self.executor.use_adapters(resident)
        self._adapter_identity = identity
        self.tokenization.adapter_formats = formats
        with self._cond:
            for sequence in [*self._running, *self._waiting]:
                sequence.adapter_index = self._adapter_index.get(sequence.request.adapter_id, -1)
            for sequence in self._waiting:
                identity = self._identity(sequence.request.adapter_id)
                if sequence.table.adapter_identity != identity:
                    sequence.table = BlockTable(identity)

    def _identity(self, adapter_id: str) -> bytes:
        return self._adapter_identity.get(adapter_id, BASE_MODEL_IDENTITY)

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the model up here, then run the loop on a new thread."""
        self.warm_up()
        self._thread = threading.Thread(target=self.run, name="loraserve-engine", daemon=True)
        self._thread.start()

    def run(self, on_ready: Callable[[], None] = lambda: None) -> None:
        """Run the loop on the calling thread until stop(). Call it from the thread that loaded the model (after
        warm_up()): OpenMP keeps a team of worker threads per thread that runs torch ops, and two teams on the same
        cores make every small op wait for its workers to wake (measured: decoding ~30% slower)."""
        self._thread = self._thread or threading.current_thread()
        self._started_at = time.monotonic()
        self._state = EngineState.RUNNING
        on_ready()
        self._loop()

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); the ones already submitted run to the end."""
        with self._cond:
            if self._state is EngineState.RUNNING:
                self._state = EngineState.DRAINING

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is waiting or running; False if the timeout passed first."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._by_id:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self) -> None:
        """Stop the thread; requests still in flight end with a Cancelled error (gRPC status CANCELLED)."""
        with self._cond:
            if self._state in (EngineState.RUNNING, EngineState.DRAINING):
                self._state = EngineState.STOPPED
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for sequence in [*self._running, *self._waiting]:
            if not sequence.finished:
                sequence.fail(Cancelled("the server shut down before this request finished; retry on another replica"))
        self._running.clear()
        self._waiting.clear()
        self._by_id.clear()

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def alive(self) -> bool:
        return self._state in (EngineState.RUNNING, EngineState.DRAINING)

    # ---- requests (any thread) -------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate, tokenize and queue a request; its output arrives on the returned stream."""
        self.check_accepting()
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        adapter = self.adapters.resolve(request.adapter_id)
        prepared = prepare(request, self.config, self.tokenization, self.max_sequence_length)
        # Compiled here, on the caller's thread, so that a slow constraint never stalls the batch.
        constraint = self.constraints.compile(request.constraint) if request.constraint is not None else None
        stream = RequestStream(request.request_id, self.cancel, lambda: self.alive)
        sequence = GenerationSequence(
            request,
            prepared.prompt_ids,
            prepared.max_new_tokens,
            stream,
            self._context,
            constraint=constraint,
        )
        if sequence.reservation > self.executor.capacity_tokens:
            raise InvalidRequest(
                f"prompt plus max_new_tokens is {sequence.reservation} tokens, more than the whole KV cache holds "
                f"({self.executor.capacity_tokens}); lower max_new_tokens, or raise the server's --kv-cache-memory",
                "stopping.max_new_tokens",
            )
        with self._cond:
            self.check_accepting()
            free_slots = self.config.max_batch_size - self._active
            if len(self._waiting) >= self.config.max_queued_requests + max(free_slots, 0):
                raise QueueFull(
                    f"the server is at capacity ({self._active} requests running, {len(self._waiting)} waiting, "
                    f"max_queued_requests={self.config.max_queued_requests}); retry later"
                )
            self.adapters.acquire(adapter)  # raises if it was unloaded since resolve()
            sequence.adapter_index = self._adapter_index.get(adapter, -1)
            sequence.table = BlockTable(self._identity(adapter))
            self._waiting.append(sequence)
            self._by_id[request.request_id] = sequence
            self._constrained_requests += constraint is not None
            self._cond.notify_all()
        return stream

    def cancel(self, request_id: str) -> None:
        """End a request at the next step (a no-op for one that already finished)."""
        with self._cond:
            sequence = self._by_id.get(request_id)
            if sequence is not None:
                sequence.cancel()
                self._cond.notify_all()

    def stats(self) -> EngineStats:
        with self._cond:
            usage = self.blocks.usage()  # counters read without the engine thread's help: at worst a step old
            return EngineStats(
                active_requests=self._active,
                queued_requests=len(self._waiting),
                generated_tokens=self._generated_tokens,
                completed_requests=self._completed,
                uptime_seconds=time.monotonic() - self._started_at,
                kv_cache_tokens=self.executor.capacity_tokens,
                kv_cache_used_tokens=usage.used_blocks * self.executor.block_size,
                kv_cache_blocks=usage.total_blocks,
                kv_cache_block_size=self.executor.block_size,
                kv_cache_used_blocks=usage.used_blocks,
                kv_cache_cached_blocks=usage.cached_blocks,
                prefix_caching=self.blocks.prefix_caching,
                prefix_cache_queried_tokens=usage.queried_tokens,
                prefix_cache_hit_tokens=usage.hit_tokens,
                preemptions=self._preemptions,
                constrained_requests=self._constrained_requests,
                constraint_mask_steps=self._mask_steps,
                constraint_mask_seconds=self._mask_seconds,
            )

    def load_adapter(self, spec: AdapterSpec, cache: Path, version: str | None, deadline: float | None) -> LoadOutcome:
        """Read an adapter here (file and network I/O stay off the engine thread), then have the engine thread make
        it resident between two steps; `deadline` (time.monotonic(), None for none) bounds both together."""
        self.check_accepting()
        where = f"adapter {spec.id} ({spec.public_source})"  # clients never see the server's paths
        try:
            adapter = self.executor.read_adapter(spec, cache, version, where)
            if adapter.info.prompt_format:  # refused here, not later on the engine thread
                load_prompt_format(adapter.info.prompt_format, self.loaded.tokenizer)
        except (ConfigError, ValueError) as error:
            raise InvalidRequest(f"{where}: {error}" if isinstance(error, ValueError) else str(error)) from None
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            self._count_load("refused")
            raise DeadlineExceeded("the deadline passed while the adapter was read; nothing was loaded")
        future = self.adapters.request_load(adapter)
        try:
            outcome = future.result(timeout)
        except FutureTimeout:
            self._count_load("refused")
            if future.cancel():  # the engine had not started on it: nothing was loaded
                raise DeadlineExceeded(
                    "the deadline passed before the adapter became resident; nothing was loaded"
                ) from None
            raise DeadlineExceeded(
                "the deadline passed while the adapter was being made resident; ListAdapters tells whether it is"
            ) from None
        except Exception:
            self._count_load("refused")
            raise
        self._count_load("loaded")
        logger.info(
            "adapter loaded",
            extra={
                "adapter_id": spec.id,
                "source": spec.public_source,
                "evicted": outcome.evicted,
                "version": adapter.info.version,
            },
        )
        return outcome

    def _count_load(self, outcome: str) -> None:
        if self.telemetry is not None:
            self.telemetry.adapter_loads.add(1, {"outcome": outcome})

    def unload_adapter(self, adapter_id: str, deadline: float | None) -> None:
        """Stop new requests for the adapter, wait (until `deadline`, time.monotonic()) for its running ones, then
        free it."""
        try:
            self.adapters.request_unload(adapter_id).result(None if deadline is None else deadline - time.monotonic())
        except FutureTimeout:
            raise DeadlineExceeded(
                f"the deadline passed while requests still ran on {adapter_id!r}; it takes no new ones and is "
                "unloaded when they finish"
            ) from None
        logger.info("adapter unloaded", extra={"adapter_id": adapter_id})

    def tokenize(
        self, text: str = "", messages: Sequence[Message] = (), details: bool = False
    ) -> tuple[int, tuple[TokenDetail, ...]]:
        """Token count (and, with details, the tokens) of a text or of messages rendered as Generate renders them."""
        ids = self.tokenization.encode(text, messages, field="text")
        return len(ids), self.tokenization.details(ids) if details else ()

    def check_accepting(self) -> None:
        """Raise Unavailable unless the engine takes new requests."""
        if self._state is EngineState.DRAINING or self._state is EngineState.STOPPED:
            raise Unavailable("the server is shutting down and takes no new requests; retry on another replica")
        if self._state is not EngineState.RUNNING:
            raise Unavailable(f"the engine is {self._state.value}; it takes no requests")

    # ---- the engine thread -----------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """One prefill and one decode step, so the first request does not pay for lazy initialisation."""
        ids = self.tokenization.encode("Hello")
        table = BlockTable(BASE_MODEL_IDENTITY)
        self.blocks.allocate(table, ids, len(ids) + 1, count_query=False)
        logits = self.executor.forward([RowWork(table.blocks, ids, 0)])
        self.executor.forward([RowWork(table.blocks, (int(logits[0].argmax()),), len(ids))])
        self.blocks.free(table)

    def _loop(self) -> None:
        """Turns until stop(). Nothing one request or adapter brings ends it: a failure ends that request (or that
        load) with its status. Only --max-consecutive-failed-steps failed steps in a row, a fault of the model
        itself, end it (health turns NOT_SERVING)."""
        try:
            while self._turn():
                pass
        except ModelFault as fault:  # the last of the failed steps in a row
            self._die(fault.__cause__ or fault)
        except BaseException as error:  # the engine must never die silently: fail everything and say so
            self._die(error)

    def _turn(self) -> bool:
        """Apply adapter changes, admit, expire, plan and step once; False when the engine stops."""
        self.adapters.apply_pending(self._use_adapters)
        try:
            admitted = self._admit()
            if admitted is None:
                return False
            self._expire_running()
            work = self._plan()
            if work:
                self._step(work)
        except ModelFault:
            raise
        except Exception as error:  # a fault outside the model's forward pass: the batch's requests end
            self._step_failed(list(self._running), error)
        return True

    def _admit(self) -> list[GenerationSequence] | None:
        """Wait for work; move waiting requests into the batch while it and the KV cache have room.
        Returns None when the engine stops."""
        expired: list[tuple[GenerationSequence, StopReason]] = []
        with self._cond:
            while (
                not self._waiting
                and not self._running
                and self._state is not EngineState.STOPPED
                and not self.adapters.has_pending()
            ):
                self._cond.wait()
            if self._state is EngineState.STOPPED:
                return None
            now = time.monotonic()
            for sequence in list(self._waiting):
                reason = sequence.expiry(now)
                if reason is not None:
                    self._waiting.remove(sequence)
                    expired.append((sequence, reason))
            admitted = self._scheduler.admit(self._waiting, self._running)
            self._active += len(admitted)
        for sequence, reason in expired:
            sequence.finish(reason)
        self._forget([sequence for sequence, _ in expired], was_active=False)
        return admitted

    def _plan(self) -> list[tuple[GenerationSequence, RowWork]]:
        """The next step's work; requests preempted to make room for it go back to the front of the queue."""
        work, preempted = self._scheduler.plan(self._running)
        if preempted:
            logger.info(
                "KV cache full: preempted requests to recompute later",
                extra={"request_ids": [s.request_id for s in preempted]},
            )
            with self._cond:
                self._waiting.extendleft(preempted)
                self._active -= len(preempted)
                self._preemptions += len(preempted)
        return work

    def _expire_running(self) -> None:
        now = time.monotonic()
        for sequence in self._running:
            reason = sequence.expiry(now)
            if reason is not None:
                sequence.finish(reason)
        self._evict_finished()

    def _step(self, work: list[tuple[GenerationSequence, RowWork]]) -> None:
        """Run one forward pass for the planned work; sample for the requests that produced logits."""
        started = time.perf_counter()
        try:
            logits = self.executor.forward([row_work for _, row_work in work])
            sampling = []
            for sequence, row_work in work:
                sequence.cached = row_work.end
                self.blocks.commit(sequence.table, sequence.token_ids, sequence.cached)
                if row_work.wants_logits:
                    sampling.append(sequence)
            sampled = sample_next(logits, [s.step_inputs() for s in sampling])
        except Exception as error:
            self._step_failed([sequence for sequence, _ in work], error)
            return
        self._failed_steps = 0
        self._advance(sampling, sampled)
        self._scheduler.budget.observe(sum(len(w.tokens) for _, w in work), time.perf_counter() - started)
        self._record(self._record_step, len(work), sampling)

    def _record_step(self, batch: int, sampled: list[GenerationSequence]) -> None:
        telemetry = self.telemetry
        assert telemetry is not None
        telemetry.batch_size.record(batch)
        telemetry.generated_tokens.add(len(sampled))
        for sequence in sampled:
            for gap in sequence.token_gaps:
                telemetry.inter_token_latency.record(gap)
            sequence.token_gaps.clear()

    def _advance(self, sequences: list[GenerationSequence], sampled: SampledTokens) -> None:
        """Hand each sequence its sampled token (sequences[i] is row i); a row without one fails its request."""
        for i, sequence in enumerate(sequences):
            error = sampled.errors.get(i)
            try:
                if error is not None:
                    raise error
                sequence.append(sampled.token_ids[i], sampled.logprobs[i], sampled.top_tokens[i])
            except Exception as failure:  # scoped to this request: the rest of the batch goes on
                self._fail_request(sequence, failure)
        with self._cond:
            self._generated_tokens += len(sequences) - len(sampled.errors)
            if sampled.mask_seconds:
                self._mask_steps += 1
                self._mask_seconds += sampled.mask_seconds
        self._evict_finished()

    @staticmethod
    def _fail_request(sequence: GenerationSequence, error: Exception) -> None:
        if not isinstance(error, LoraserveError):
            logger.error(
                "a request failed while its token was taken", exc_info=error, extra={"request_id": sequence.request_id}
            )
            error = ModelFailure("the server failed while generating this request (the log has details)")
        else:
            logger.warning("a request failed", extra={"request_id": sequence.request_id, "reason": str(error)})
        sequence.fail(error)

    def _evict_finished(self) -> None:
        """Drop finished requests from the batch, freeing their KV cache blocks."""
        done = [s for s in self._running if s.finished]
        if not done:
            return
        for sequence in done:
            self._scheduler.release(sequence)
        self._running = [s for s in self._running if not s.finished]
        self._forget(done, was_active=True)

    def _forget(self, sequences: list[GenerationSequence], was_active: bool) -> None:
        if not sequences:
            return
        with self._cond:
            for sequence in sequences:
                self._by_id.pop(sequence.request_id, None)
                self.adapters.release(sequence.request.adapter_id)
            self._completed += len(sequences)
            if was_active:
                self._active -= len(sequences)
            self._cond.notify_all()
        for sequence in sequences:
            self._record(self._record_request, sequence)

    def _record(self, record: Callable[..., None], *args: Any) -> None:
        """Telemetry, which must never fail a request or the engine: an error in it is logged and dropped."""
        if self.telemetry is None:
            return
        try:
            record(*args)
        except Exception as error:
            logger.error("recording telemetry failed", exc_info=error)

    def _record_request(self, sequence: GenerationSequence) -> None:
        telemetry = self.telemetry
        assert telemetry is not None
        if sequence.first_token_at is not None:
            telemetry.time_to_first_token.record(sequence.first_token_at - sequence.arrival)

        def wall(moment: float | None) -> int | None:
            return wall_ns(moment) if moment is not None else None

        attributes = {
            "request_id": sequence.request_id,
            "adapter_id": sequence.request.adapter_id,
            "input_tokens": len(sequence.prompt_ids),
            "generated_tokens": len(sequence.generated),
        }
        telemetry.request_spans(
            sequence.trace_context,
            wall_ns(sequence.arrival),
            wall(sequence.admitted_at),
            wall(sequence.first_token_at),
            time.time_ns(),
            attributes,
        )

    def _step_failed(self, sequences: list[GenerationSequence], error: Exception) -> None:
        """A step raised: fail its requests, free their blocks, keep serving the others. After
        --max-consecutive-failed-steps failures in a row the model itself is at fault: ModelFault is raised (before
        the requests are failed, so that health is NOT_SERVING by the time their clients hear), and the engine
        ends."""
        self._failed_steps += 1
        logger.error(
            "a model step failed; its requests end with INTERNAL",
            exc_info=error,
            extra={
                "request_ids": [s.request_id for s in sequences],
                "consecutive_failures": self._failed_steps,
            },
        )
        if self._failed_steps >= self.config.max_consecutive_failed_steps:
            raise ModelFault(f"{self._failed_steps} model steps failed in a row") from error
        for sequence in sequences:
            if not sequence.finished:
                sequence.fail(ModelFailure("the model failed while running this request; retry it"))
        self._evict_finished()

    def _die(self, error: BaseException) -> None:
        logger.critical("the engine thread died; failing every request", exc_info=error)
        with self._cond:
            self._state = EngineState.FAILED
            pending = [*self._running, *self._waiting]
            self._running, self._by_id = [], {}
            self._waiting.clear()
            self._cond.notify_all()
        # Health first: a client told UNAVAILABLE that checks health at once must already see NOT_SERVING.
        if self._on_failure is not None:
            self._on_failure(error)
        for sequence in pending:
            sequence.fail(Unavailable("the engine stopped; the server is unhealthy"))
        self.adapters.fail_pending(Unavailable("the engine stopped; the server is unhealthy"))
