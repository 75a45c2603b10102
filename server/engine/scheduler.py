"""What each engine step does: which waiting requests join the batch (batch size and free KV cache blocks
permitting), which running request is preempted when the cache is full, and what every running request feeds the
model: decoding requests their last token first, then prompt chunks within the step's token budget."""

from __future__ import annotations

import time
from collections import deque

from loraserve.server.engine.block_manager import BlockManager
from loraserve.server.engine.sequence import GenerationSequence
from loraserve.server.engine.step_budget import StepBudget
from loraserve.server.models.types import RowWork


class Scheduler:
    """Admission, preemption and step planning."""

    def __init__(self, blocks: BlockManager, max_batch_size: int, budget: StepBudget) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.budget = budget

    def admit(self, waiting: deque[GenerationSequence], running: list[GenerationSequence]) -> list[GenerationSequence]:
        """Move requests from the front of `waiting` into `running` while the batch and the cache have room.

        Strictly first come, first served: a request that does not fit holds back the ones behind it, so a long
        request is never starved by a stream of short ones. A request is given the blocks for everything it must
        feed (reusing cached prefix blocks), and one block per running request stays free so that they can grow."""
        admitted: list[GenerationSequence] = []
        while waiting and len(running) < self.max_batch_size:
            sequence = waiting[0]
            first = sequence.cached_prompt_tokens is None
            tokens = sequence.token_ids()
            hit = self.blocks.allocate(sequence.table, tokens, len(tokens), count_query=first, reserve=len(running))
            if hit is None:
                break
            waiting.popleft()
            sequence.cached = hit
            if first:
                sequence.cached_prompt_tokens = hit
                sequence.admitted_at = time.monotonic()
            running.append(sequence)
            admitted.append(sequence)
        return admitted

    def release(self, sequence: GenerationSequence) -> None:
        """Free a finished request's blocks (those holding a known prefix stay cached)."""
        self.blocks.free(sequence.table)

    def plan(
        self, running: list[GenerationSequence]
    ) -> tuple[list[tuple[GenerationSequence, RowWork]], list[GenerationSequence]]:
        """The work of the next step, and the requests preempted (taken out of `running`) to make room for it,
        newest first.

        Every decoding request feeds its last token; when one needs a new block and none is left, the newest running
        request is preempted: its blocks are freed and it is recomputed when admitted again (its full blocks stay in
        the prefix cache, so mostly they are found there). Prompt tokens then fill the step up to the budget, oldest
        request first."""
        preempted: list[GenerationSequence] = []
        for sequence in [s for s in running if s.pending == 1]:
            while sequence in running and not self.blocks.grow(sequence.table, sequence.cached + 1):
                victim = running.pop()
                self.blocks.free(victim.table)
                victim.preempted()
                preempted.append(victim)
        work: list[tuple[GenerationSequence, RowWork]] = []
        for sequence in running:
            if sequence.pending == 1:
                row = RowWork(sequence.table.blocks, sequence.next_tokens(1), sequence.cached, sequence.adapter_index)
                work.append((sequence, row))
        budget = self.budget.prefill_tokens(len(work), len(running) - len(work))
        for sequence in running:
            if sequence.pending <= 1 or budget <= 0:
                continue
            chunk = sequence.next_tokens(budget)
            budget -= len(chunk)
            wants_logits = sequence.cached + len(chunk) == sequence.token_count
            row = RowWork(sequence.table.blocks, chunk, sequence.cached, sequence.adapter_index, wants_logits)
            work.append((sequence, row))
        return work, preempted
