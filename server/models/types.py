"""Plain value types shared across the layers (no torch, no transformers): what the engine asks of a model runner
for one step, and what ModelInfo reports about the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowWork:
    """One sequence's share of a step: tokens to feed at positions start, start+1, ... of its KV cache.

    `blocks` is the sequence's block table: the KV cache blocks that hold its positions, in order; it covers at least
    positions [0, start + len(tokens))."""

    blocks: Sequence[int]
    tokens: Sequence[int]
    start: int
    adapter: int = -1  # index of the request's adapter among the resident ones; -1 for the base model
    wants_logits: bool = True  # False for a prompt chunk that does not end the prompt

    @property
    def end(self) -> int:
        """Cached positions of the sequence after this step."""
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class ModelDescription:
    """What ModelInfo reports about the served model."""

    name: str
    source: str
    architecture: str
    dtype: str
    device: str
    quantization: str
    max_sequence_length: int
    vocab_size: int
