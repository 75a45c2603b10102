"""Which KV cache blocks each sequence holds, and the prefix cache: full blocks keyed by what they hold.

A block is free, held (by one or more sequences: a shared prefix is held by every sequence that uses it), or cached
(no sequence holds it, but it keeps the keys and values of a known prefix). A full block is keyed by a chained hash:
the hash of the previous block's key, the adapter's identity and the block's token ids. The adapter's identity is a
hash of its weights (never its name alone), so reloading an adapter under the same id with new weights can never
reuse stale blocks. A sequence that starts with the same tokens under the same adapter takes the blocks instead of
recomputing them (vLLM's automatic prefix caching). Free blocks go first; when none are left, cached blocks are
evicted least recently used first.

Plain Python: the engine decides, the model runner's PagedKVCache owns the memory the block ids point into.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BASE_MODEL_IDENTITY = b"base"


def chain_hash(parent: bytes, adapter_identity: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: a hash of the previous block's key, the adapter and the block's tokens.
    A cryptographic hash, so that no prompt can be crafted to collide with another tenant's prefix."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(adapter_identity)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


@dataclass
class BlockUsage:
    """Counters for ModelInfo."""

    total_blocks: int
    used_blocks: int
    cached_blocks: int
    queried_tokens: int
    hit_tokens: int


class BlockTable:
    """A sequence's blocks and the keys of its full blocks (keys depend only on tokens, so they survive preemption)."""

    def __init__(self, adapter_identity: bytes) -> None:
        self.adapter_identity = adapter_identity
        self.blocks: list[int] = []
        self.keys: list[bytes] = []  # keys of the first len(keys) full blocks of the sequence's tokens
        self.committed = 0  # leading full blocks already offered to the prefix cache

    def extend_keys(self, tokens: Sequence[int], block_size: int) -> None:
        """Compute the keys of every full block of `tokens` not keyed yet."""
        for index in range(len(self.keys), len(tokens) // block_size):
            parent = self.keys[-1] if self.keys else b""
            block_tokens = tokens[index * block_size : (index + 1) * block_size]
            self.keys.append(chain_hash(parent, self.adapter_identity, block_tokens))


class BlockManager:
    """Hands out block ids 1..num_blocks (block 0 is the cache's scratch block). Engine thread only."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks + 1))
        self._refs = [0] * (num_blocks + 1)
        self._key_of: dict[int, bytes] = {}  # block -> key, for full blocks that hold a known prefix
        self._block_of: dict[bytes, int] = {}  # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no one holds, least recent first
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def available(self) -> int:
        """Blocks a sequence could be given now: free ones and cached ones no one holds."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> BlockUsage:
        return BlockUsage(
            total_blocks=self.num_blocks,
            used_blocks=self.num_blocks - self.available,
            cached_blocks=len(self._evictable),
            queried_tokens=self.queried_tokens,
            hit_tokens=self.hit_tokens,
        )

    def allocate(
        self, table: BlockTable, tokens: Sequence[int], needed: int, count_query: bool, reserve: int = 0
    ) -> int | None:
        """Give a sequence with no blocks the blocks for its first `needed` positions, reusing cached prefix blocks
        for the full blocks of `tokens` it can, and leaving at least `reserve` blocks available. Returns the
        positions already computed (the prefix hit), or None (and changes nothing) when there is not enough room.
        The last token is always computed again, so that the step that feeds it yields logits: a hit covers at most
        len(tokens) - 1 positions."""
        hits = self._prefix_hits(table, tokens)
        new_blocks = -(-needed // self.block_size) - len(hits)
        revived = sum(1 for block in hits if self._refs[block] == 0)
        if new_blocks + revived + reserve > self.available:
            return None
        for block in hits:
            self._hold(block)
        table.blocks = hits + [self._take() for _ in range(new_blocks)]
        table.committed = len(hits)
        hit_tokens = len(hits) * self.block_size
        if count_query:
            self.queried_tokens += len(tokens)
            self.hit_tokens += hit_tokens
        return hit_tokens

    def grow(self, table: BlockTable, positions: int) -> bool:
        """Make the table cover `positions` positions; False (nothing taken) when the cache is full."""
        needed = -(-positions // self.block_size) - len(table.blocks)
        if needed > self.available:
            return False
        for _ in range(needed):
            table.blocks.append(self._take())
        return True

    def commit(self, table: BlockTable, tokens: Callable[[], Sequence[int]], computed: int) -> None:
        """Record the full blocks among the first `computed` positions as cached prefixes, for later requests.
        `tokens` gives the sequence's tokens; it is called only when a block was filled since the last commit."""
        full = computed // self.block_size
        if not self.prefix_caching or full <= table.committed:
            return
        table.extend_keys(tokens()[: full * self.block_size], self.block_size)
        for index in range(table.committed, full):
            block, key = table.blocks[index], table.keys[index]
            if block in self._key_of or key in self._block_of:
                continue  # already known (a hit, or the same prefix computed twice at once: keep the first)
            self._key_of[block] = key
            self._block_of[key] = block
        table.committed = full

    def free(self, table: BlockTable) -> None:
        """Let go of a sequence's blocks. Blocks that hold a known prefix stay cached; the tail goes first when
        evicting (freed last to first), so a shared head outlives the ends of the requests that used it."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.blocks = []
        table.committed = 0

    def _prefix_hits(self, table: BlockTable, tokens: Sequence[int]) -> list[int]:
        if not self.prefix_caching:
            return []
        table.extend_keys(tokens, self.block_size)
        limit = (len(tokens) - 1) // self.block_size
        hits = []
        for key in table.keys[:limit]:
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block
