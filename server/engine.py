"""The engine: one thread owns the model and runs the batch; RPC threads submit requests and read their streams.

Each turn of the loop admits waiting requests into the running batch (a bounded number of prompt tokens per turn, so
running streams are never held up for long), drops requests that were cancelled or ran out of time, and decodes one
token for every running request. A request joins at the next turn and leaves the moment it finishes, freeing its
KV cache. The engine knows nothing of gRPC.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from loraserve.config import EngineConfig
from loraserve.errors import InvalidRequest, QueueFull, Unavailable
from loraserve.prompting import Message
from loraserve.server.hf_runner import HFBatchRunner
from loraserve.server.loading import LoadedModel
from loraserve.server.outputs import StopReason, TokenDetail
from loraserve.server.params import GenerationRequest
from loraserve.server.request_stream import RequestStream
from loraserve.server.sampling import sample_next
from loraserve.server.sequence import Sequence as GenerationSequence
from loraserve.server.sequence import SequenceContext
from loraserve.server.tokenization import Tokenization

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class EngineStats:
    """Live counters for ModelInfo."""

    active_requests: int
    queued_requests: int
    generated_tokens: int
    completed_requests: int
    uptime_seconds: float


class Engine:
    """Batches requests onto one model. submit, cancel, stats and tokenize are safe to call from any thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenization = Tokenization(loaded.tokenizer, loaded.prompt_format)
        self._on_failure = on_failure
        self._runner = HFBatchRunner(loaded.model, loaded.pad_token_id, uses_adapters=bool(loaded.adapters))
        self._context = SequenceContext(
            tokenization=self.tokenization,
            eos_token_ids=loaded.eos_token_ids,
            max_sequence_length=loaded.description.max_sequence_length,
            device=self._runner.device,
        )
        self._cond = threading.Condition()
        self._waiting: deque[GenerationSequence] = deque()
        self._running: list[GenerationSequence] = []  # row i of the runner's batch is _running[i]
        self._by_id: dict[str, GenerationSequence] = {}
        self._active = 0
        self._generated_tokens = 0
        self._completed = 0
        self._state = EngineState.CREATED
        self._started_at = time.monotonic()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the model up, then start the engine thread."""
        self._warm_up()
        self._started_at = time.monotonic()
        self._state = EngineState.RUNNING
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

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
        """Stop the thread; requests still in flight end with STOP_REASON_CANCELLED."""
        with self._cond:
            if self._state in (EngineState.RUNNING, EngineState.DRAINING):
                self._state = EngineState.STOPPED
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for sequence in [*self._running, *self._waiting]:
            if not sequence.finished:
                sequence.finish(StopReason.CANCELLED)
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
        self._check_accepting()
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        self.loaded.adapters.resolve(request.adapter_id)
        max_new_tokens = self._check_limits(request)
        prompt_ids = self._prompt_ids(request)
        stream = RequestStream(request.request_id, self.cancel, lambda: self.alive)
        sequence = GenerationSequence(request, prompt_ids, max_new_tokens, stream, self._context)
        with self._cond:
            self._check_accepting()
            free_slots = self.config.max_batch_size - self._active
            if len(self._waiting) >= self.config.max_queued_requests + max(free_slots, 0):
                raise QueueFull(
                    f"the server is at capacity ({self._active} requests running, {len(self._waiting)} waiting, "
                    f"max_queued_requests={self.config.max_queued_requests}); retry later"
                )
            self._waiting.append(sequence)
            self._by_id[request.request_id] = sequence
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
            return EngineStats(
                active_requests=self._active,
                queued_requests=len(self._waiting),
                generated_tokens=self._generated_tokens,
                completed_requests=self._completed,
                uptime_seconds=time.monotonic() - self._started_at,
            )

    def tokenize(
        self, text: str = "", messages: Sequence[Message] = (), details: bool = False
    ) -> tuple[int, tuple[TokenDetail, ...]]:
        """Token count (and, with details, the tokens) of a text or of messages rendered as Generate renders them."""
        ids = self.tokenization.encode(text, messages)
        return len(ids), self.tokenization.details(ids) if details else ()

    def _check_accepting(self) -> None:
        if self._state is EngineState.DRAINING or self._state is EngineState.STOPPED:
            raise Unavailable("the server is shutting down and takes no new requests; retry on another replica")
        if self._state is not EngineState.RUNNING:
            raise Unavailable(f"the engine is {self._state.value}; it takes no requests")

    def _check_limits(self, request: GenerationRequest) -> int:
        """Check the request against the server's limits; return its max_new_tokens."""
        config, stopping = self.config, request.stopping
        if stopping.max_new_tokens is not None and stopping.max_new_tokens > config.max_new_tokens:
            raise InvalidRequest(
                f"must be <= {config.max_new_tokens} (the server's limit), got {stopping.max_new_tokens}",
                "stopping.max_new_tokens",
            )
        max_new_tokens = stopping.max_new_tokens or config.default_max_new_tokens
        if stopping.min_new_tokens > max_new_tokens:
            raise InvalidRequest(
                f"({stopping.min_new_tokens}) must not exceed max_new_tokens ({max_new_tokens})",
                "stopping.min_new_tokens",
            )
        if len(stopping.stop_sequences) > config.max_stop_sequences:
            raise InvalidRequest(
                f"at most {config.max_stop_sequences} are allowed, got {len(stopping.stop_sequences)}",
                "stopping.stop_sequences",
            )
        for i, stop in enumerate(stopping.stop_sequences):
            if len(stop) > config.max_stop_sequence_length:
                raise InvalidRequest(
                    f"is {len(stop)} characters; at most {config.max_stop_sequence_length} are allowed",
                    f"stopping.stop_sequences[{i}]",
                )
        if request.output.top_n > config.max_top_n:
            raise InvalidRequest(f"must be <= {config.max_top_n}, got {request.output.top_n}", "response.top_n")
        return max_new_tokens

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        ids = self.tokenization.encode(request.prompt, request.messages)
        field = "messages" if request.messages else "prompt"
        if not ids:
            raise InvalidRequest("encodes to no tokens", field)
        if request.truncate_input_tokens and len(ids) > request.truncate_input_tokens:
            ids = ids[-request.truncate_input_tokens :]
        limit = self._context.max_sequence_length
        if len(ids) >= limit:
            raise InvalidRequest(
                f"is {len(ids)} tokens, but the context holds {limit} tokens including at least one new token; "
                f"shorten it or set truncate_input_tokens (at most {limit - 1})",
                field,
            )
        return ids

    # ---- the engine thread -----------------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """One prefill and one decode step, so the first request does not pay for lazy initialisation."""
        ids = self.tokenization.encode("Hello")
        logits = self._runner.prefill([ids], [""])
        self._runner.decode([int(logits[0].argmax())])
        self._runner.reset()

    def _loop(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                self._expire_running()
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._decode()
        except BaseException as error:  # the engine must never die silently: fail everything and say so
            self._die(error)

    def _admit(self) -> list[GenerationSequence] | None:
        """Wait for work; take the waiting requests that fit the batch and this turn's prefill budget.
        Returns None when the engine stops."""
        expired: list[tuple[GenerationSequence, StopReason]] = []
        with self._cond:
            while not self._waiting and not self._running and self._state is not EngineState.STOPPED:
                self._cond.wait()
            if self._state is EngineState.STOPPED:
                return None
            now = time.monotonic()
            for sequence in list(self._waiting):
                reason = sequence.expiry(now)
                if reason is not None:
                    self._waiting.remove(sequence)
                    expired.append((sequence, reason))
            admitted: list[GenerationSequence] = []
            budget = self.config.max_prefill_tokens
            while self._waiting and len(self._running) + len(admitted) < self.config.max_batch_size:
                prompt_length = len(self._waiting[0].prompt_ids)
                if admitted and prompt_length > budget:
                    break
                budget -= prompt_length
                admitted.append(self._waiting.popleft())
            self._active += len(admitted)
        for sequence, reason in expired:
            sequence.finish(reason)
        self._forget([sequence for sequence, _ in expired], was_active=False)
        return admitted

    def _expire_running(self) -> None:
        now = time.monotonic()
        for sequence in self._running:
            reason = sequence.expiry(now)
            if reason is not None:
                sequence.finish(reason)
        self._evict_finished()

    def _prefill(self, sequences: list[GenerationSequence]) -> None:
        try:
            logits = self._runner.prefill([s.prompt_ids for s in sequences], [s.request.adapter_id for s in sequences])
        except Exception as error:
            self._fail_step(sequences, error, "prefill")
            return
        self._running.extend(sequences)
        self._advance(sequences, logits)

    def _decode(self) -> None:
        try:
            logits = self._runner.decode([s.last_token for s in self._running])
        except Exception as error:
            failed = self._running
            self._running = []
            self._runner.reset()
            self._fail_step(failed, error, "decode")
            return
        self._advance(self._running, logits)

    def _advance(self, sequences: list[GenerationSequence], logits: torch.Tensor) -> None:
        """Sample a token for each sequence (row i of logits is sequences[i]) and hand it to the sequence."""
        sampled = sample_next(logits, [s.step_inputs() for s in sequences])
        for i, sequence in enumerate(sequences):
            sequence.append(sampled.token_ids[i], sampled.logprobs[i], sampled.top_tokens[i])
        with self._cond:
            self._generated_tokens += len(sequences)
        self._evict_finished()

    def _evict_finished(self) -> None:
        """Drop finished rows from the batch, freeing their cache."""
        keep = [i for i, s in enumerate(self._running) if not s.finished]
        if len(keep) == len(self._running):
            return
        done = [s for s in self._running if s.finished]
        self._runner.keep(keep)
        self._running = [self._running[i] for i in keep]
        self._forget(done, was_active=True)

    def _forget(self, sequences: list[GenerationSequence], was_active: bool) -> None:
        if not sequences:
            return
        with self._cond:
            for sequence in sequences:
                self._by_id.pop(sequence.request_id, None)
            self._completed += len(sequences)
            if was_active:
                self._active -= len(sequences)
            self._cond.notify_all()
        for sequence in sequences:
            _log_finished(sequence)

    def _fail_step(self, sequences: list[GenerationSequence], error: Exception, step: str) -> None:
        """A batch step raised: fail its requests, keep serving the others."""
        logger.error(
            "%s failed; its requests end with INTERNAL",
            step,
            exc_info=error,
            extra={"request_ids": [s.request_id for s in sequences]},
        )
        for sequence in sequences:
            sequence.fail(RuntimeError(f"the model failed during {step}"))
        self._forget(sequences, was_active=True)

    def _die(self, error: BaseException) -> None:
        logger.critical("the engine thread died; failing every request", exc_info=error)
        with self._cond:
            self._state = EngineState.FAILED
            pending = [*self._running, *self._waiting]
            self._running, self._by_id = [], {}
            self._waiting.clear()
            self._cond.notify_all()
        for sequence in pending:
            sequence.fail(Unavailable("the engine stopped; the server is unhealthy"))
        if self._on_failure is not None:
            self._on_failure(error)


def _log_finished(sequence: GenerationSequence) -> None:
    now = time.monotonic()
    first = sequence.first_token_at
    logger.info(
        "request finished",
        extra={
            "request_id": sequence.request_id,
            "adapter_id": sequence.request.adapter_id,
            "stop_reason": sequence.stop_reason.value if sequence.stop_reason else "error",
            "input_tokens": len(sequence.prompt_ids),
            "generated_tokens": len(sequence.generated),
            "time_to_first_token_s": round(first - sequence.arrival, 4) if first else None,
            "duration_s": round(now - sequence.arrival, 4),
        },
    )
