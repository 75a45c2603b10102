"""Decoding over the kept contiguous rows (DecodeKV) gives the logits of attending over the gathered paged blocks,
through every way a row changes: sequences joining, sitting a step out (dropped, their rows compacted), rejoining
(refilled from their blocks), running past the rows' capacity, work without a sequence, and a batch too large for
the rows' memory bound."""

from __future__ import annotations

import random

import torch

from loraserve.server.models.kv_blocks import PagedKVCache
from loraserve.server.models.llama import LlamaRunner, prepare_linears
from loraserve.server.models.types import RowWork
from tests.server.models.test_llama_runner import tiny

BLOCK = 4  # small blocks: sequences cross many block boundaries


def runner(in_place: bool, blocks: int = 200) -> LlamaRunner:
    model = tiny("llama")
    kv = PagedKVCache(LlamaRunner.cache_shape(model, torch.float32), blocks, BLOCK, torch.device("cpu"))
    built = LlamaRunner(model, prepare_linears(model), kv, None)
    if not in_place:
        built.decode_kv = None
    return built


def tables(count: int, per_sequence: int) -> list[list[int]]:
    """Scattered, interleaved block tables."""
    ids = list(range(1, 1 + count * per_sequence))
    random.Random(3).shuffle(ids)
    return [ids[i::count] for i in range(count)]


def test_kept_rows_match_gathered_blocks_through_joins_drops_and_growth() -> None:
    rng = random.Random(0)
    in_place, gathered = runner(True), runner(False)
    count, length = 6, 60
    blocks = tables(count, -(-length // BLOCK))
    tokens = [[rng.randrange(300) for _ in range(length)] for _ in range(count)]
    prompt = [rng.randrange(3, 12) for _ in range(count)]
    work = [RowWork(blocks[s], tokens[s][: prompt[s]], 0, sequence=s) for s in range(count)]  # prompts, one step
    for r in (in_place, gathered):
        r.step(work)
    cached = list(prompt)
    filled: list[int] = []  # rows filled from the paged blocks, per step
    fill = in_place.decode_kv._fill
    in_place.decode_kv._fill = lambda fresh: (filled.append(len(fresh)), fill(fresh))[1]  # type: ignore[method-assign]
    steps = singles = 0
    for _ in range(45):
        # Each sequence decodes this step with probability 0.8; sequence 5 is work without a sequence serial.
        chosen = [s for s in range(count) if rng.random() < 0.8 and cached[s] < length]
        work = [RowWork(blocks[s], (tokens[s][cached[s]],), cached[s], sequence=s if s < 5 else -1) for s in chosen]
        if not work:
            continue
        expected = gathered.step(work)
        actual = in_place.step(work)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        steps, singles = steps + 1, singles + len(work)
        for s in chosen:
            cached[s] += 1
    # Every step attended in place; most rows were kept from the step before, and dropped ones were refilled.
    assert len(filled) == steps > 30
    assert count < sum(filled) < singles / 2
    assert in_place.decode_kv.capacity[1] > 16  # grew past the first allocation (positions are at most 12 + 1 then)


def test_a_decode_step_beside_a_prompt_chunk_attends_in_place() -> None:
    rng = random.Random(1)
    in_place, gathered = runner(True), runner(False)
    a, b = [rng.randrange(300) for _ in range(30)], [rng.randrange(300) for _ in range(30)]
    for r in (in_place, gathered):
        r.step([RowWork([1, 2, 3, 4, 5, 6, 7, 8], a[:10], 0, sequence=0)])
    for position in range(10, 20):
        work = [
            RowWork([1, 2, 3, 4, 5, 6, 7, 8], (a[position],), position, sequence=0),
            RowWork([9, 10, 11, 12, 13, 14, 15, 16], b[2 * (position - 10) : 2 * (position - 9)], 2 * (position - 10)),
        ]
        torch.testing.assert_close(in_place.step(work), gathered.step(work), atol=1e-5, rtol=1e-5)
    assert in_place.decode_kv.capacity != (0, 0)


def test_rows_that_would_outgrow_the_paged_cache_fall_back_to_gathering() -> None:
    rng = random.Random(2)
    # 13 blocks of 4 positions: two sequences of 21 positions (24 with padding) in rows grown by 8 rows and a quarter
    # need 8 x 32 positions: more than the paged cache's 52.
    in_place, gathered = runner(True, blocks=13), runner(False, blocks=13)
    a, b = [rng.randrange(300) for _ in range(21)], [rng.randrange(300) for _ in range(21)]
    for r in (in_place, gathered):
        r.step(
            [RowWork([1, 2, 3, 4, 5, 6], a[:20], 0, sequence=0), RowWork([7, 8, 9, 10, 11, 12], b[:20], 0, sequence=1)]
        )
    work = [
        RowWork([1, 2, 3, 4, 5, 6], (a[20],), 20, sequence=0),
        RowWork([7, 8, 9, 10, 11, 12], (b[20],), 20, sequence=1),
    ]
    torch.testing.assert_close(in_place.step(work), gathered.step(work), atol=1e-5, rtol=1e-5)
    assert in_place.decode_kv.capacity == (0, 0)
