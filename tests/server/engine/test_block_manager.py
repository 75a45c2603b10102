"""Block accounting and the prefix cache, without a model: allocation and freeing, sharing by reference count, hits
keyed by tokens and adapter identity, the last token always recomputed, least-recently-used eviction."""

from __future__ import annotations

from loraserve.server.engine.block_manager import BASE_MODEL_IDENTITY, BlockManager, BlockTable, chain_hash

BS = 4


def table(identity: bytes = BASE_MODEL_IDENTITY) -> BlockTable:
    return BlockTable(identity)


def run(manager: BlockManager, tokens: list[int], identity: bytes = BASE_MODEL_IDENTITY) -> tuple[BlockTable, int]:
    """Admit a sequence and pretend its prompt was computed."""
    t = table(identity)
    hit = manager.allocate(t, tokens, len(tokens), count_query=True)
    assert hit is not None
    manager.commit(t, lambda: tokens, len(tokens))
    return t, hit


def test_allocation_covers_the_positions_and_free_returns_everything() -> None:
    manager = BlockManager(num_blocks=10, block_size=BS, prefix_caching=False)
    t = table()
    assert manager.allocate(t, list(range(9)), 9, count_query=True) == 0
    assert len(t.blocks) == 3 and 0 not in t.blocks and manager.available == 7
    assert manager.grow(t, 12) and len(t.blocks) == 3
    assert manager.grow(t, 13) and len(t.blocks) == 4
    manager.free(t)
    assert t.blocks == [] and manager.available == 10 and manager.usage().used_blocks == 0


def test_a_request_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(num_blocks=4, block_size=BS, prefix_caching=True)
    first, _ = run(manager, list(range(8)))
    t = table()
    assert manager.allocate(t, list(range(100, 110)), 10, count_query=True) is None  # needs 3, 2 left
    assert t.blocks == [] and manager.available == 2
    assert manager.allocate(t, list(range(100, 107)), 7, count_query=True, reserve=1) is None  # 2 + 1 reserved
    assert not manager.grow(first, 17) and len(first.blocks) == 2


def test_full_blocks_are_shared_and_the_last_token_is_recomputed() -> None:
    manager = BlockManager(num_blocks=10, block_size=BS, prefix_caching=True)
    prompt = list(range(12))  # three full blocks
    first, hit = run(manager, prompt)
    assert hit == 0
    second, hit = run(manager, prompt)
    assert hit == 8  # blocks 0 and 1 are reused; block 2 holds the last token, which must be fed again
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    longer, hit = run(manager, [*prompt, 50, 51])
    assert hit == 12 and longer.blocks[:3] == first.blocks
    usage = manager.usage()
    assert usage.used_blocks == 3 + 1 + 1 and usage.hit_tokens == 20 and usage.queried_tokens == 38


def test_hits_need_the_same_head_and_the_same_adapter() -> None:
    manager = BlockManager(num_blocks=20, block_size=BS, prefix_caching=True)
    run(manager, list(range(12)))
    assert run(manager, [99, *range(1, 12)])[1] == 0  # a different first token changes every key after it
    assert run(manager, list(range(12)), identity=b"adapter-weights-1")[1] == 0
    assert run(manager, list(range(12)), identity=b"adapter-weights-1")[1] == 8
    assert run(manager, list(range(12)), identity=b"adapter-weights-2")[1] == 0


def test_keys_chain_the_whole_prefix() -> None:
    a = chain_hash(b"", BASE_MODEL_IDENTITY, [1, 2, 3, 4])
    assert chain_hash(a, BASE_MODEL_IDENTITY, [5, 6, 7, 8]) != chain_hash(b"", BASE_MODEL_IDENTITY, [5, 6, 7, 8])
    assert chain_hash(b"", b"x", [1, 2, 3, 4]) != a


def test_unheld_prefix_blocks_stay_cached_and_are_evicted_least_recently_used_first() -> None:
    manager = BlockManager(num_blocks=8, block_size=BS, prefix_caching=True)
    old, _ = run(manager, list(range(9)))  # 3 blocks, 2 of them full and keyed
    new, _ = run(manager, list(range(100, 109)))
    manager.free(old)
    manager.free(new)
    usage = manager.usage()
    assert usage.used_blocks == 0 and usage.cached_blocks == 4 and manager.available == 8
    # 6 blocks needed, 4 plain free ones: the 2 evicted are the older request's prefix
    filler = table()
    assert manager.allocate(filler, list(range(200, 224)), 24, count_query=False) == 0
    manager.free(filler)
    assert run(manager, list(range(9)))[1] == 0
    assert run(manager, list(range(100, 109)))[1] == 8


def test_nothing_is_reused_with_prefix_caching_off() -> None:
    manager = BlockManager(num_blocks=10, block_size=BS, prefix_caching=False)
    first, _ = run(manager, list(range(12)))
    manager.free(first)
    assert run(manager, list(range(12)))[1] == 0
    assert manager.usage().cached_blocks == 0
