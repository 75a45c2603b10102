"""The paged KV cache's layout: keys and values written at a sequence's slots come back, in order, from its block
table, whatever blocks it was given; sizing by memory; the scratch block."""

from __future__ import annotations

import pytest
import torch

from loraserve.server.models.kv_blocks import SCRATCH_BLOCK, CacheShape, PagedKVCache

SHAPE = CacheShape(num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)


def test_written_positions_are_gathered_back_in_sequence_order() -> None:
    cache = PagedKVCache(SHAPE, num_blocks=8, block_size=4, device=torch.device("cpu"))
    tables = [[5, 1, 6], [2, 7]]
    lengths = [11, 6]
    for layer in range(SHAPE.num_layers):
        for table, length in zip(tables, lengths, strict=True):
            slots = torch.tensor([cache.slot(table, p) for p in range(length)])
            keys = torch.arange(length, dtype=torch.float32)[:, None, None].expand(length, 2, 4) + 100 * layer
            cache.write(layer, slots, keys, -keys)
    padded = torch.tensor([[5, 1, 6], [2, 7, SCRATCH_BLOCK]])
    for layer in range(SHAPE.num_layers):
        keys, values = cache.gather(layer, padded)
        assert keys.shape == (2, 2, 12, 4)  # [sequences, kv_heads, positions, head_dim]
        for row, length in enumerate(lengths):
            expected = torch.arange(length, dtype=torch.float32) + 100 * layer
            assert torch.equal(keys[row, 1, :length, 3], expected)
            assert torch.equal(values[row, 0, :length, 0], -expected)


def test_slots_follow_the_block_table() -> None:
    cache = PagedKVCache(SHAPE, num_blocks=8, block_size=16, device=torch.device("cpu"))
    assert [cache.slot([3, 5], p) for p in (0, 15, 16, 20)] == [48, 63, 80, 84]
    assert cache.blocks_for(16) == 1 and cache.blocks_for(17) == 2


def test_size_by_memory_and_the_scratch_block_is_not_usable() -> None:
    cache = PagedKVCache.within(SHAPE, 10 * 16 * SHAPE.bytes_per_token + 5, 16, torch.device("cpu"))
    assert cache.num_blocks == 10 and cache.usable_blocks == 9 and cache.capacity_tokens == 144
    with pytest.raises(ValueError, match="too small"):
        PagedKVCache.within(SHAPE, 16 * SHAPE.bytes_per_token, 16, torch.device("cpu"))
