"""The KV cache: admission arithmetic, row compaction, and widening or narrowing rows without losing data."""

from __future__ import annotations

import pytest
import torch

from loraserve.server.kv_cache import CacheShape, KVCache, row_length_for

SHAPE = CacheShape(num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)


def fill(cache: KVCache, row: int, value: float, length: int) -> None:
    for layer in range(SHAPE.num_layers):
        cache.keys(layer)[row, :, :length] = value
        cache.values(layer)[row, :, :length] = -value


def held(cache: KVCache, row: int, length: int) -> float:
    values = {float(cache.keys(layer)[row, :, :length].mean()) for layer in range(SHAPE.num_layers)}
    assert len(values) == 1 and all(
        torch.equal(cache.values(layer)[row, :, :length], -cache.keys(layer)[row, :, :length])
        for layer in range(SHAPE.num_layers)
    )
    return values.pop()


def test_row_lengths_follow_a_power_of_two_ladder() -> None:
    assert [row_length_for(n, 4096) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 4096]


def test_admission_keeps_every_row_within_the_budget() -> None:
    cache = KVCache(SHAPE, budget_tokens=2048, max_length=2048, device=torch.device("cpu"))
    rows = [cache.admit(100) for _ in range(7)]  # 8 rows of 256, one of them scratch
    assert rows == list(range(7)) and not cache.can_admit(100)
    assert cache.active_rows * cache.row_length <= cache.budget_tokens
    cache.release(3)
    assert cache.can_admit(100) and not cache.can_admit(600)  # 600 needs rows of 1024: only 2 fit
    assert cache.fits(1000) and not cache.fits(1100)  # one row of 1024 plus the scratch row fit; 2048-wide does not


def test_release_moves_the_last_row_into_the_gap() -> None:
    cache = KVCache(SHAPE, budget_tokens=2048, max_length=2048, device=torch.device("cpu"))
    for value in range(3):
        fill(cache, cache.admit(10), float(value + 1), 10)
    assert cache.release(0) == 2
    assert [held(cache, row, 10) for row in range(2)] == [3.0, 2.0]
    assert cache.release(1) is None and cache.active_rows == 1


@pytest.mark.parametrize("widen_to", [300, 900])
def test_widening_and_narrowing_keep_every_row(widen_to: int) -> None:
    cache = KVCache(SHAPE, budget_tokens=8192, max_length=2048, device=torch.device("cpu"))
    for value in range(3):
        fill(cache, cache.admit(200), float(value + 1), 200)
    long_row = cache.admit(widen_to)
    assert cache.row_length == row_length_for(widen_to, 2048) > 256
    assert [held(cache, row, 200) for row in range(3)] == [1.0, 2.0, 3.0]
    fill(cache, long_row, 9.0, widen_to)
    cache.release(long_row)
    cache.shrink_if_possible()
    assert cache.row_length == 256 and [held(cache, row, 200) for row in range(3)] == [1.0, 2.0, 3.0]
