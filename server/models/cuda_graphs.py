"""Decode steps as captured CUDA graphs: at small batch sizes a decode step is hundreds of tiny kernels whose launch
overhead, not the GPU, sets the pace (HF batch-1 decode reaches 15% of the memory roofline on an H200). A captured
graph launches them all at once.

A graph has fixed shapes, so steps are padded to a bucket: the batch to the next of a few sizes (padded rows write
their keys to the cache's scratch block and are ignored), the block tables to the next power of two of blocks. One
graph is captured per (batch, blocks) bucket on first use. The KV pools never move, so graphs stay valid until the
LoRA banks they read are replaced. Only decode-only steps use graphs; steps that feed prompt chunks run eagerly.

With capture=False the same padded, fixed-shape step runs eagerly: that is how the padding logic is tested on a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.server.models.decoder import DecoderRunner
from loraserve.server.models.kv_blocks import SCRATCH_BLOCK
from loraserve.server.models.types import RowWork

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class StaticDecode:
    """The fixed input buffers of one bucket, and its captured graph and output (None when not capturing)."""

    token_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, n]
    lengths: torch.Tensor  # [B]
    adapters: torch.Tensor  # [B]
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


def bucket(value: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in buckets if b >= value), None)


def blocks_bucket(blocks: int) -> int:
    width = 1
    while width < blocks:
        width *= 2
    return width


class DecodeGraphs:
    """Runs decode-only steps through per-bucket static buffers, replaying a captured CUDA graph when capturing."""

    def __init__(self, runner: DecoderRunner, max_batch_size: int, capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.batch_buckets = (*(b for b in BATCH_BUCKETS if b < max_batch_size), max_batch_size)
        self._statics: dict[tuple[int, int], StaticDecode] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def invalidate(self) -> None:
        """Drop every captured graph (the LoRA banks they read were replaced)."""
        self._statics.clear()

    def step(self, work: Sequence[RowWork]) -> torch.Tensor | None:
        """The logits of a decode-only step (row i is work[i]); None when the step does not qualify."""
        if not work or not all(len(w.tokens) == 1 and w.wants_logits for w in work):
            return None
        rows = bucket(len(work), self.batch_buckets)
        if rows is None:
            return None
        kv = self.runner.kv
        width = blocks_bucket(max(kv.blocks_for(w.end) for w in work))
        static = self._statics.get((rows, width)) or self._prepare(rows, width)
        self._fill(static, work)
        if static.graph is None:
            return self._run(static)[: len(work)]
        static.graph.replay()
        assert static.logits is not None
        return static.logits[: len(work)]

    def _run(self, static: StaticDecode) -> torch.Tensor:
        return self.runner.decode(
            static.token_ids, static.positions, static.slots, static.tables, static.lengths, static.adapters
        )

    def _fill(self, static: StaticDecode, work: Sequence[RowWork]) -> None:
        kv = self.runner.kv
        rows, width = static.tables.shape
        pad = rows - len(work)

        def values(real: list[int], padding: int) -> torch.Tensor:
            return torch.tensor(real + [padding] * pad, dtype=torch.long)

        tables = [list(w.blocks[: kv.blocks_for(w.end)]) for w in work]
        tables = [t + [SCRATCH_BLOCK] * (width - len(t)) for t in tables] + [[SCRATCH_BLOCK] * width] * pad
        static.token_ids.copy_(values([w.tokens[0] for w in work], 0), non_blocking=True)
        static.positions.copy_(values([w.start for w in work], 0), non_blocking=True)
        scratch = kv.slot([SCRATCH_BLOCK], 0)
        static.slots.copy_(values([kv.slot(w.blocks, w.start) for w in work], scratch), non_blocking=True)
        static.tables.copy_(torch.tensor(tables, dtype=torch.long), non_blocking=True)
        static.lengths.copy_(values([w.end for w in work], 1), non_blocking=True)
        static.adapters.copy_(values([w.adapter for w in work], -1), non_blocking=True)

    def _prepare(self, rows: int, width: int) -> StaticDecode:
        device = self.runner.device

        def buffer(value: int) -> torch.Tensor:
            return torch.full((rows,), value, dtype=torch.long, device=device)

        # Until filled, every row writes to the scratch block: warming up and capturing touch no request's cache.
        tables = torch.full((rows, width), SCRATCH_BLOCK, dtype=torch.long, device=device)
        scratch = self.runner.kv.slot([SCRATCH_BLOCK], 0)
        static = StaticDecode(buffer(0), buffer(0), buffer(scratch), tables, buffer(1), buffer(-1))
        if self.capture:
            self._capture(static)
        self._statics[(rows, width)] = static
        return static

    def _capture(self, static: StaticDecode) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation must not happen during capture
                self._run(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static.logits = self._run(static)
        static.graph = graph
        logger.info(
            "captured a decode graph", extra={"batch": static.tables.shape[0], "blocks": static.tables.shape[1]}
        )
