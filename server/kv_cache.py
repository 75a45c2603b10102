"""The KV cache: one memory pool per layer, sized by a token budget, viewed as a rectangle of rows x positions.

Every running request owns one row (its slot); active rows are kept compact at the front ([0, n)), so a decode step
attends over a plain view of the cache instead of gathering pages (gathering costs ~10x more than the attention
itself on a CPU). The rectangle's width (positions per row) follows the longest reservation among the active
requests, on a power-of-two ladder; the pool never grows, so the cache never uses more than its budget, and admission
is decided by the same arithmetic: a request is admitted only if every active row, its own included, still fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MIN_ROW_LENGTH = 256
# "auto" on a CPU: a tenth of the machine's memory, at most 2 GiB (45,000 tokens of SmolLM2-135M in float32).
CPU_AUTO_FRACTION, CPU_AUTO_MAX_BYTES = 0.10, 2 * 1024**3
# "auto" on CUDA: this share of the memory still free once the model is loaded.
CUDA_AUTO_FRACTION = 0.90


def budget_bytes(setting: int | None, device: torch.device) -> int:
    """The KV cache's size in bytes: the configured one, or (None) the device's automatic share."""
    if setting is not None:
        return setting
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_AUTO_FRACTION)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(physical * CPU_AUTO_FRACTION, CPU_AUTO_MAX_BYTES))


def row_length_for(tokens: int, max_length: int) -> int:
    """The rectangle width that holds `tokens`: the next power of two (at least 256), capped at max_length."""
    width = MIN_ROW_LENGTH
    while width < tokens:
        width *= 2
    return min(width, max_length)


@dataclass(frozen=True)
class CacheShape:
    """What the cache stores per token."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * element  # keys and values


class KVCache:
    """Rows of keys and values for the running requests, within a fixed budget of token positions.

    Row `rows - 1` of every layout is a scratch row that no request owns: padded rows of a fixed-shape (CUDA graph)
    decode step write there.
    """

    def __init__(self, shape: CacheShape, budget_tokens: int, max_length: int, device: torch.device) -> None:
        if budget_tokens < 2 * MIN_ROW_LENGTH:
            raise ValueError(
                f"a KV cache of {budget_tokens} tokens is too small; it needs at least {2 * MIN_ROW_LENGTH}"
            )
        self.shape = shape
        self.budget_tokens = budget_tokens
        self.max_length = max_length
        self.device = device
        numel = budget_tokens * shape.kv_heads * shape.head_dim
        # Pools are never resized; layouts are views of them. They start zeroed: attention reads masked positions too,
        # and a NaN left there by uninitialised memory would poison a whole row (NaN * 0 is NaN).
        self._key_pools = [torch.zeros(numel, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self._value_pools = [torch.zeros(numel, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.reservations: list[int] = []  # tokens reserved by the request in each active row
        self.row_length = MIN_ROW_LENGTH
        self.layout_version = 0
        self._set_layout(MIN_ROW_LENGTH)

    @property
    def active_rows(self) -> int:
        return len(self.reservations)

    @property
    def rows(self) -> int:
        """Rows in the current layout, the scratch row included."""
        return self.budget_tokens // self.row_length

    @property
    def scratch_row(self) -> int:
        return self.rows - 1

    def fits(self, reservation: int) -> bool:
        """Whether a request reserving this many tokens could ever be admitted (alone)."""
        return reservation <= self.max_length and 2 * row_length_for(reservation, self.max_length) <= self.budget_tokens

    def can_admit(self, reservation: int) -> bool:
        """Whether one more row reserving `reservation` tokens fits next to the active rows (and the scratch row)."""
        width = row_length_for(max([reservation, *self.reservations]), self.max_length)
        return self.active_rows + 2 <= self.budget_tokens // width

    def admit(self, reservation: int) -> int:
        """Give a new request the next row; widen the rectangle first if its reservation needs it."""
        if not self.can_admit(reservation):
            raise RuntimeError("admit() called for a request that does not fit; check can_admit() first")
        width = row_length_for(max([reservation, *self.reservations]), self.max_length)
        if width != self.row_length:
            self._relayout(width)
        self.reservations.append(reservation)
        return self.active_rows - 1

    def release(self, row: int) -> int | None:
        """Free a row. The last active row moves into it to keep rows compact; returns the row that moved, if any."""
        last = self.active_rows - 1
        moved = None
        if row != last:
            for pools in (self._key_pools, self._value_pools):
                for pool in pools:
                    view = self._view(pool)
                    view[row].copy_(view[last])
            self.reservations[row] = self.reservations[last]
            moved = last
        self.reservations.pop()
        return moved

    def shrink_if_possible(self) -> None:
        """Narrow the rectangle when the longest request has left, so more rows fit."""
        width = row_length_for(max(self.reservations, default=0), self.max_length)
        if width < self.row_length:
            self._relayout(width)

    def keys(self, layer: int) -> torch.Tensor:
        """Layer's keys: [rows, kv_heads, row_length, head_dim]."""
        return self._layer_keys[layer]

    def values(self, layer: int) -> torch.Tensor:
        return self._layer_values[layer]

    def _view(self, pool: torch.Tensor) -> torch.Tensor:
        rows, width = self.rows, self.row_length
        return pool[: rows * width * self.shape.kv_heads * self.shape.head_dim].view(
            rows, self.shape.kv_heads, width, self.shape.head_dim
        )

    def _set_layout(self, width: int) -> None:
        self.row_length = width
        self._layer_keys = [self._view(pool) for pool in self._key_pools]
        self._layer_values = [self._view(pool) for pool in self._value_pools]
        self.layout_version += 1

    def _relayout(self, width: int) -> None:
        """Re-view the pools at a new width, moving every active row's data in place.

        Widening moves rows to higher offsets, so rows are moved last to first; narrowing, first to last. Either
        way a row's new place only overlaps rows already moved, and each row is cloned before it is written.
        """
        old_width, keep = self.row_length, min(self.row_length, width)
        order = range(self.active_rows - 1, -1, -1) if width > old_width else range(self.active_rows)
        old = [(self._view(p), p) for p in (*self._key_pools, *self._value_pools)]
        self.row_length = width
        for old_view, pool in old:
            new_view = self._view(pool)
            for row in order:
                new_view[row, :, :keep].copy_(old_view[row, :, :keep].clone())
        self._set_layout(width)
