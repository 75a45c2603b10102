"""What each engine step does: which waiting requests join the batch (batch size and KV cache budget permitting),
and what every running request feeds the model (its last token, or the next chunk of its prompt)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq

from loraserve.server.kv_cache import KVCache
from loraserve.server.llama_runner import RowWork
from loraserve.server.sequence import Sequence


class Scheduler:
    """Admission and step planning; owns the mapping of requests to KV cache rows."""

    def __init__(self, kv: KVCache, max_batch_size: int, max_prefill_tokens: int) -> None:
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens

    def admit(self, waiting: deque[Sequence], running: list[Sequence]) -> list[Sequence]:
        """Move requests from the front of `waiting` into `running` while the batch and the cache have room.

        Strictly first come, first served: a request that does not fit holds back the ones behind it, so a long
        request is never starved by a stream of short ones."""
        admitted: list[Sequence] = []
        while waiting and len(running) < self.max_batch_size:
            reservation = waiting[0].reservation
            if not self.kv.can_admit(reservation):
                self.kv.shrink_if_possible()
                if not self.kv.can_admit(reservation):
                    break
            sequence = waiting.popleft()
            sequence.row = self.kv.admit(reservation)
            sequence.admitted_at = time.monotonic()
            running.append(sequence)
            admitted.append(sequence)
        return admitted

    def release(self, sequence: Sequence, holders: Seq[Sequence]) -> None:
        """Free a finished request's row; whichever of `holders` owned the row that moved into it learns its new row."""
        if sequence.row is None:
            return
        moved_from = self.kv.release(sequence.row)
        if moved_from is not None:
            for other in holders:
                if other.row == moved_from:
                    other.row = sequence.row
                    break
        sequence.row = None

    def plan(self, running: Seq[Sequence]) -> list[tuple[Sequence, RowWork]]:
        """Every decoding request feeds its last token (in row order); prompts are fed in chunks, oldest request
        first, at most max_prefill_tokens per step, so a long prompt never holds the running streams up for long."""
        work: list[tuple[Sequence, RowWork]] = []
        budget = self.max_prefill_tokens
        decoding = sorted((s for s in running if s.prefilled), key=lambda s: s.row)  # row order: graph-friendly
        for sequence in decoding:
            tokens: tuple[int, ...] = (sequence.last_token,)
            work.append((sequence, RowWork(sequence.row, tokens, sequence.cached, sequence.adapter_index)))
        for sequence in running:
            if sequence.prefilled or budget == 0:
                continue
            end = min(len(sequence.prompt_ids), sequence.cached + budget)
            chunk = sequence.prompt_ids[sequence.cached : end]
            budget -= len(chunk)
            wants_logits = end == len(sequence.prompt_ids)
            work.append((sequence, RowWork(sequence.row, chunk, sequence.cached, sequence.adapter_index, wants_logits)))
        return work
