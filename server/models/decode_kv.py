"""The running decode batch's keys and values, one contiguous row per sequence, kept from step to step.

A decode step attends over every cached position of every decoding sequence. Read from the paged cache, that means
gathering each sequence's blocks into one padded batch, in every layer of every step: a copy of all the batch's keys
and values, as large as what attention then reads (measured on a CPU, 32 sequences of 176 positions: 31 ms per step
for gather and attention over SmolLM2-135M's 30 layers, 22 ms attending in place). Here each decoding sequence keeps
a row of [kv_heads, capacity, head_dim] per layer: filled from its blocks once, when it starts decoding, then extended
by one position per step, so that attention reads a view of the rows and nothing is gathered.

The paged cache stays the record (the prefix cache, preemption and prompt chunks use it); these rows are a copy of
the decoding sequences' part of it. A row is kept while its sequence feeds one token per step, and dropped as soon as
a step goes by without it (finished, cancelled, preempted, or feeding a prompt chunk): the last row moves into the
hole, so the rows of a step are always 0..n-1. Their memory is bounded by the paged cache's size: a batch whose
padded rows would need more is attended from the paged blocks instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from loraserve.server.models.kv_blocks import PagedKVCache
from loraserve.server.models.types import RowWork

# Rows grow in steps of this many, positions by a quarter (and a block) at a time: few reallocations, little slack.
ROW_GROWTH = 8
POSITION_GROWTH = 1.25


class DecodeKV:
    """Contiguous copies of the decoding sequences' keys and values. Only the engine thread uses it."""

    def __init__(self, paged: PagedKVCache) -> None:
        self.paged = paged
        self.max_bytes = paged.num_blocks * paged.block_size * paged.shape.bytes_per_token
        self._rows: dict[int, int] = {}  # sequence -> its row
        self._lengths: list[int] = []  # positions each row holds
        self._keys: list[torch.Tensor] = []  # per layer: [row capacity, kv_heads, position capacity, head_dim]
        self._values: list[torch.Tensor] = []
        self._anonymous = itertools.count(-1, -1)  # keys for work without a sequence: never matched again

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the buffers hold now."""
        return (self._keys[0].shape[0], self._keys[0].shape[2]) if self._keys else (0, 0)

    def arrange(self, singles: Sequence[RowWork]) -> list[RowWork] | None:
        """Hold exactly these single-token work items' cached positions (those before this step), and return the
        items in row order: item i is row i. None when the rows would take more memory than the paged cache; then
        nothing is held, and the step attends from the paged blocks."""
        width = self.paged.blocks_for(max((w.end for w in singles), default=0)) * self.paged.block_size
        rows, positions = self._capacity_for(len(singles), width)
        if not singles or rows * positions * self.paged.shape.bytes_per_token > self.max_bytes:
            self.release()
            return None
        kept = [w for w in singles if self._holds(w)]
        self._keep({w.sequence for w in kept})
        fresh = [w for w in singles if not self._holds(w)]
        self._reserve(rows, positions)
        self._fill(fresh)
        for w in fresh:
            self._rows[w.sequence if w.sequence >= 0 else next(self._anonymous)] = len(self._lengths)
            self._lengths.append(w.start)
        return sorted(kept, key=lambda w: self._rows[w.sequence]) + fresh

    def _holds(self, w: RowWork) -> bool:
        """Whether w's sequence has a row holding exactly the positions before w."""
        row = self._rows.get(w.sequence) if w.sequence >= 0 else None
        return row is not None and self._lengths[row] == w.start

    def _capacity_for(self, rows: int, width: int) -> tuple[int, int]:
        """The buffers' (rows, positions) once grown to hold `rows` rows of `width` positions."""
        have_rows, have_positions = self.capacity
        if rows <= have_rows and width <= have_positions:
            return have_rows, have_positions
        new_positions = self.paged.blocks_for(int(width * POSITION_GROWTH)) * self.paged.block_size
        return max(have_rows, -(-rows // ROW_GROWTH) * ROW_GROWTH), max(have_positions, new_positions)

    def _keep(self, keep: set[int]) -> None:
        """Drop every row but these sequences', moving the last rows into the holes so that rows stay 0..n-1."""
        rows = sorted(self._rows.items(), key=lambda item: item[1])
        holes = [row for sequence, row in rows if sequence not in keep]
        movers = [(sequence, row) for sequence, row in rows if sequence in keep and row >= len(keep)]
        for (sequence, source), target in zip(movers, [h for h in holes if h < len(keep)], strict=True):
            for buffers in (self._keys, self._values):
                for buffer in buffers:
                    buffer[target] = buffer[source]
            self._rows[sequence] = target
            self._lengths[target] = self._lengths[source]
        self._rows = {sequence: row for sequence, row in self._rows.items() if sequence in keep}
        del self._lengths[len(keep) :]

    def _reserve(self, rows: int, positions: int) -> None:
        """Grow the buffers to `rows` rows of `positions` positions, keeping what the rows hold."""
        if (rows, positions) == self.capacity:
            return
        shape = self.paged.shape
        size = (rows, shape.kv_heads, positions, shape.head_dim)
        held = len(self._lengths)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            # Zeroed: positions past a row's length are read (masked), and NaN * 0 from uninitialised memory is NaN.
            new = torch.zeros(size, dtype=shape.dtype, device=self.paged.device)
            if old is not None and held:
                new[:held, :, : old.shape[2]] = old[:held]
            return new

        layers = range(shape.num_layers)
        self._keys = [grown(self._keys[i] if self._keys else None) for i in layers]
        self._values = [grown(self._values[i] if self._values else None) for i in layers]

    def _fill(self, fresh: list[RowWork]) -> None:
        """Copy the cached positions of sequences new to the rows from their blocks, into the rows after those held."""
        if not fresh:
            return
        first = len(self._lengths)
        blocks = max(self.paged.blocks_for(w.start) for w in fresh)
        if blocks == 0:
            return
        # Padded with each table's own first block: the padding lands past a row's length, where nothing is read.
        tables = torch.tensor(
            [list(w.blocks[:blocks]) + [w.blocks[0]] * (blocks - len(w.blocks[:blocks])) for w in fresh]
        )
        tables = tables.to(self.paged.device)
        positions = blocks * self.paged.block_size
        rows = slice(first, first + len(fresh))
        for layer in range(self.paged.shape.num_layers):
            keys, values = self.paged.gather(layer, tables)
            self._keys[layer][rows, :, :positions] = keys
            self._values[layer][rows, :, :positions] = values

    def append(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the step's keys and values of rows 0..n-1 at their positions. positions: [n]; keys, values:
        [n, kv_heads, head_dim]."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        self._keys[layer][rows, :, positions] = keys
        self._values[layer][rows, :, positions] = values

    def advance(self) -> None:
        """After a step: every row holds one more position."""
        self._lengths = [length + 1 for length in self._lengths]

    def view(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows 0..n-1, positions [0, width): [n, kv_heads, width, head_dim] views."""
        rows = len(self._lengths)
        return self._keys[layer][:rows, :, :width], self._values[layer][:rows, :, :width]

    def release(self) -> None:
        """Hold nothing and free the buffers."""
        self._rows.clear()
        self._lengths.clear()
        self._keys, self._values = [], []
