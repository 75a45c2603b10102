"""The paged KV cache's memory and layout: for every layer, a pool of fixed-size blocks of keys and values.

This is the one module that knows how a sequence's positions map to memory. A sequence owns a block table (its
blocks, in order); position p of the sequence lives in block table[p // block_size] at offset p % block_size.
The runner writes keys and values through `write` and reads them through `gather`, or hands `pools` to the native
decode-attention kernel (paged_attention.c, which reads this layout in place); the CUDA-graph buffers are sized by
`blocks_for`, and the engine's block manager hands out block ids from `usable_blocks`; none of them encodes the
layout itself.

Layout per layer: [num_blocks, block_size, kv_heads, head_dim], contiguous. Seen as a 2-D table of blocks, gathering
a batch's blocks is one `index_select` of whole rows (a memcpy per block, measured 25x faster on a CPU than indexing
the 4-D tensor), and the result is a [B, kv_heads, positions, head_dim] view that attention reads without a copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Block 0 is never handed out: padded rows of a fixed-shape (CUDA graph) step write their keys there.
SCRATCH_BLOCK = 0
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


class PagedKVCache:
    """Keys and values of every layer in blocks of `block_size` positions. Only the engine thread uses it."""

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, device: torch.device) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV cache of {num_blocks} blocks is too small; it needs at least 2")
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        size = (num_blocks, block_size, shape.kv_heads, shape.head_dim)
        # Zeroed: masked positions are read too, and a NaN from uninitialised memory would poison a row (NaN * 0).
        self._keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self._values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]

    @classmethod
    def within(cls, shape: CacheShape, size_bytes: int, block_size: int, device: torch.device) -> PagedKVCache:
        """As many blocks as fit in size_bytes."""
        return cls(shape, size_bytes // (shape.bytes_per_token * block_size), block_size, device)

    @property
    def usable_blocks(self) -> int:
        """Blocks a sequence may be given: all but the scratch block."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.usable_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    def slot(self, blocks: list[int] | tuple[int, ...], position: int) -> int:
        """Where position `position` of a sequence with block table `blocks` lives, as a flat token slot."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store each token's key and value at its slot. slots: [T]; keys, values: [T, kv_heads, head_dim]."""
        width = self.shape.kv_heads * self.shape.head_dim
        self._keys[layer].view(-1, width).index_copy_(0, slots, keys.reshape(-1, width))
        self._values[layer].view(-1, width).index_copy_(0, slots, values.reshape(-1, width))

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of a batch of block tables. tables: [B, n] block ids.
        Returns keys, values: [B, kv_heads, n * block_size, head_dim] (views of one fresh copy each)."""
        rows, blocks = tables.shape
        flat = tables.reshape(-1)
        shape = (rows, blocks * self.block_size, self.shape.kv_heads, self.shape.head_dim)
        keys = self._keys[layer].view(self.num_blocks, -1).index_select(0, flat).view(shape)
        values = self._values[layer].view(self.num_blocks, -1).index_select(0, flat).view(shape)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as stored, [num_blocks, block_size, kv_heads, head_dim] each, for a kernel that
        reads the blocks in place."""
        return self._keys[layer], self._values[layer]
