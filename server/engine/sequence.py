"""One request inside the engine: its prompt and generated tokens, the text so far, why and when it stops, and the
stream its chunks go to."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from loraserve.errors import InvalidRequest
from loraserve.server.engine.block_manager import BASE_MODEL_IDENTITY, BlockTable
from loraserve.server.engine.constraints import RowConstraint
from loraserve.server.engine.detokenizer import REPLACEMENT_CHARACTER, IncrementalDetokenizer
from loraserve.server.engine.outputs import GenerationChunk, StopReason, TokenDetail, TopToken
from loraserve.server.engine.params import GenerationRequest
from loraserve.server.engine.request_stream import RequestStream
from loraserve.server.engine.sampling import RowSampler, RowStep
from loraserve.server.engine.stopping import StopMatch, StopSequenceMatcher
from loraserve.server.engine.tokenization import Tokenization

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceContext:
    """What every sequence of one engine shares."""

    tokenization: Tokenization
    eos_token_ids: frozenset[int]
    max_sequence_length: int
    device: torch.device
    log_prompts: bool = False  # put prompt and output text in the "request finished" log line


class GenerationSequence:
    """A request being generated. Only the engine thread calls its methods, except `cancel`."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        max_new_tokens: int,
        stream: RequestStream,
        context: SequenceContext,
        adapter_index: int = -1,
        constraint: RowConstraint | None = None,
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.adapter_index = adapter_index  # among the resident adapters; -1 for the base model
        # KV cache positions this request may fill: its prompt and every token it may generate.
        self.reservation = min(len(prompt_ids) + max_new_tokens, context.max_sequence_length)
        self.table = BlockTable(BASE_MODEL_IDENTITY)  # its KV cache blocks while it runs (the engine sets the adapter)
        self.cached = 0  # tokens whose keys and values are in its blocks
        self.cached_prompt_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
        self.stream = stream
        self.context = context
        self.generated: list[int] = []
        self.constraint = constraint
        self.sampler = RowSampler.create(request.sampling, context.device)
        self.arrival = time.monotonic()
        limit_ms = request.stopping.time_limit_ms
        self.time_limit_at = self.arrival + limit_ms / 1000 if limit_ms else None
        self.first_token_at: float | None = None
        self.admitted_at: float | None = None  # when it got a KV cache row
        self.last_token_at: float | None = None
        self.token_gaps: list[float] = []  # seconds between tokens, until the engine records them
        self.trace_context = otel_context.get_current()  # the RPC's span, parent of this request's spans
        self.cancelled = False
        self.finished = False
        self.stop_reason: StopReason | None = None
        self._detokenizer = IncrementalDetokenizer(context.tokenization.decode, prompt_ids)
        self._stops = StopSequenceMatcher(request.stopping.stop_sequences, request.stopping.include_stop_sequence)
        self._text = ""
        self._emitted = 0  # characters of _text already sent
        self._input_tokens_pending = request.output.input_tokens

    @property
    def token_count(self) -> int:
        """Prompt and generated tokens."""
        return len(self.prompt_ids) + len(self.generated)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled: the prompt (or, after a preemption, everything) not
        yet in the KV cache; 1 while decoding."""
        return self.token_count - self.cached

    def next_tokens(self, limit: int) -> list[int]:
        """Up to `limit` of the tokens to feed next."""
        start = self.cached
        if start >= len(self.prompt_ids):
            return self.generated[start - len(self.prompt_ids) : start - len(self.prompt_ids) + limit]
        return self.token_ids()[start : start + limit]

    def preempted(self) -> None:
        """Its blocks were taken back: everything is fed again when it is admitted again."""
        self.cached = 0

    def cancel(self) -> None:
        """Ask for the request to end (any thread); the engine acts on it before its next step."""
        self.cancelled = True

    def step_inputs(self) -> RowStep:
        """What sampling needs for this row at this step."""
        params = self.request.sampling
        below_min = len(self.generated) < self.request.stopping.min_new_tokens
        output = self.request.output
        return RowStep(
            sampler=self.sampler,
            history=self.prompt_ids + self.generated if params.repetition_penalty != 1.0 else (),
            suppressed_ids=tuple(self.context.eos_token_ids) if below_min else (),
            logprobs=output.logprobs,
            top_n=output.top_n,
            constraint=self.constraint,
        )

    def expiry(self, now: float) -> StopReason | None:
        """Why the request must end before the next step, if it must: cancelled, past its deadline or time limit."""
        deadline = self.request.deadline
        if self.cancelled or (deadline is not None and now >= deadline):
            return StopReason.CANCELLED
        if self.time_limit_at is not None and now >= self.time_limit_at:
            return StopReason.TIME_LIMIT
        return None

    def append(self, token_id: int, logprob: float | None, top: list[tuple[int, float]]) -> None:
        """Take the token sampled for this request; emit its chunk, the last one when the request is done."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps.append(now - (self.last_token_at or now))
        self.last_token_at = now
        self.generated.append(token_id)
        details = self._token_details(token_id, logprob, top)
        stoppable = len(self.generated) >= self.request.stopping.min_new_tokens
        constraint_complete = False
        if self.constraint is not None:
            self.constraint.advance(token_id)
            if self.constraint.error is not None:
                self.fail(InvalidRequest(f"cannot be followed further: {self.constraint.error}", "constraint"))
                return
            constraint_complete = self.constraint.complete
        is_eos = token_id in self.context.eos_token_ids
        if is_eos and constraint_complete:
            self.finish(StopReason.CONSTRAINT_COMPLETE, details, eos=True)
            return
        if is_eos and stoppable:
            self.finish(StopReason.EOS_TOKEN, details, eos=True)
            return
        new_from = len(self._text)
        self._text += self._detokenizer.push(token_id)
        match = self._stops.find(self._text, new_from) if stoppable else None
        if match is not None:
            self.finish(StopReason.STOP_SEQUENCE, details, match)
        elif constraint_complete:
            self.finish(StopReason.CONSTRAINT_COMPLETE, details)
        elif len(self.generated) >= self.max_new_tokens:
            self.finish(StopReason.MAX_TOKENS, details)
        elif len(self.prompt_ids) + len(self.generated) >= self.context.max_sequence_length:
            self.finish(StopReason.TOKEN_LIMIT, details)
        else:
            # Hold back a tail that could be the start of a stop sequence, so streamed text is never taken back.
            safe_end = max(self._emitted, len(self._text) - self._stops.holdback)
            self._emit(self._text[self._emitted : safe_end], details)
            self._emitted = safe_end

    def finish(
        self,
        reason: StopReason,
        details: tuple[TokenDetail, ...] = (),
        match: StopMatch | None = None,
        eos: bool = False,
    ) -> None:
        """End the request: send the rest of its text and the stop reason. `eos`: the last token was an
        end-of-sequence token, whose text is not part of the output."""
        if match is None and not eos:
            tail = self._detokenizer.flush()
            if self.constraint is not None and not self.constraint.complete:
                # Cut off inside a character: its U+FFFD would make the text no prefix of the constraint's language.
                tail = tail.removesuffix(REPLACEMENT_CHARACTER)
            self._text += tail
        end = match.end if match is not None else len(self._text)
        self.finished = True
        self.stop_reason = reason
        self._log_finished()
        self._emit(self._text[self._emitted : end], details, reason, match.sequence if match else "")
        self._emitted = end

    def fail(self, error: BaseException) -> None:
        """End the request with an error instead of a result."""
        self.finished = True
        self.stream.put(error)

    def _log_finished(self) -> None:
        first = self.first_token_at
        fields = {
            "request_id": self.request_id,
            "adapter_id": self.request.adapter_id,
            "stop_reason": self.stop_reason.value if self.stop_reason else None,
            "input_tokens": len(self.prompt_ids),
            "generated_tokens": len(self.generated),
            "time_to_first_token_s": round(first - self.arrival, 4) if first else None,
            "duration_s": round(time.monotonic() - self.arrival, 4),
        }
        span = trace.get_current_span(self.trace_context).get_span_context()
        if span.is_valid:
            fields["trace_id"] = format(span.trace_id, "032x")
        if self.context.log_prompts:
            fields["prompt"] = self.request.prompt or [m.content for m in self.request.messages]
            fields["output"] = self._text
        logger.info("request finished", extra=fields)

    def _token_details(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]]
    ) -> tuple[TokenDetail, ...]:
        if not self.request.output.token_details:
            return ()
        texts = self.context.tokenization.token_texts([token_id, *(i for i, _ in top)])
        top_tokens = tuple(TopToken(id=i, text=t, logprob=lp) for (i, lp), t in zip(top, texts[1:], strict=True))
        return (TokenDetail(id=token_id, text=texts[0], logprob=logprob, top_tokens=top_tokens),)

    def _emit(
        self, text: str, tokens: tuple[TokenDetail, ...], reason: StopReason | None = None, stop_sequence: str = ""
    ) -> None:
        input_tokens: tuple[TokenDetail, ...] = ()
        if self._input_tokens_pending:
            input_tokens = self.context.tokenization.details(self.prompt_ids)
            self._input_tokens_pending = False
        self.stream.put(
            GenerationChunk(
                request_id=self.request_id,
                text=text,
                input_token_count=len(self.prompt_ids),
                cached_input_token_count=self.cached_prompt_tokens or 0,
                generated_token_count=len(self.generated),
                tokens=tokens,
                seed=self.sampler.seed,
                stop_reason=reason,
                stop_sequence=stop_sequence,
                input_tokens=input_tokens,
            )
        )
