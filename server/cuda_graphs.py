"""Decode steps as captured CUDA graphs: at small batch sizes a decode step is hundreds of tiny kernels whose launch
overhead, not the GPU, sets the pace (HF batch-1 decode reaches 15% of the memory roofline on an H200). A captured
graph launches them all at once.

A graph has fixed shapes, so steps are padded to a bucket: the batch to the next of a few sizes (padded rows write
their keys to the cache's scratch row and are ignored), the attended width to the next power of two. One graph is
captured per (batch, width) bucket on first use, and all are dropped when the KV cache changes its layout. Only
decode-only steps use graphs; steps that feed prompt chunks run eagerly.

With capture=False the same padded, fixed-shape step runs eagerly: that is how the padding logic is tested on a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.server.kv_cache import MIN_ROW_LENGTH
from loraserve.server.llama_runner import LlamaRunner, RowWork

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class StaticDecode:
    """The fixed input buffers of one bucket, and its captured graph and output (None when not capturing)."""

    token_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    write_rows: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    adapters: torch.Tensor  # [B]
    width: int
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


def bucket(value: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in buckets if b >= value), None)


def width_bucket(width: int) -> int:
    bucket_width = MIN_ROW_LENGTH
    while bucket_width < width:
        bucket_width *= 2
    return bucket_width


class DecodeGraphs:
    """Runs decode-only steps through per-bucket static buffers, replaying a captured CUDA graph when capturing."""

    def __init__(self, runner: LlamaRunner, max_batch_size: int, capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.batch_buckets = (*(b for b in BATCH_BUCKETS if b < max_batch_size), max_batch_size)
        self._statics: dict[tuple[int, int], StaticDecode] = {}
        self._layout_version = runner.kv.layout_version
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def invalidate(self) -> None:
        """Drop every captured graph (the LoRA banks they read were replaced)."""
        self._statics.clear()

    def step(self, work: Sequence[RowWork]) -> torch.Tensor | None:
        """The logits of a decode-only step in which row i decodes work[i]; None when the step does not qualify."""
        kv = self.runner.kv
        n = len(work)
        decode_only = all(len(w.tokens) == 1 and w.row == i and w.wants_logits for i, w in enumerate(work))
        if n != kv.active_rows or not decode_only:
            return None
        rows = bucket(n, self.batch_buckets)
        width = width_bucket(max(w.start for w in work) + 1)
        if rows is None or rows > kv.scratch_row or width > kv.row_length:
            return None
        if kv.layout_version != self._layout_version:  # graphs hold the old views of the cache
            self._statics.clear()
            self._layout_version = kv.layout_version
        static = self._statics.get((rows, width)) or self._prepare(rows, width)
        self._fill(static, work)
        if static.graph is None:
            return self._run(static)[:n]
        static.graph.replay()
        assert static.logits is not None
        return static.logits[:n]

    def _run(self, static: StaticDecode) -> torch.Tensor:
        return self.runner.decode(
            static.token_ids, static.positions, static.write_rows, static.lengths, static.adapters, static.width
        )

    def _fill(self, static: StaticDecode, work: Sequence[RowWork]) -> None:
        n, scratch = len(work), self.runner.kv.scratch_row
        rows = static.token_ids.shape[0]
        pad = rows - n

        def values(real: list[int], padding: int) -> torch.Tensor:
            return torch.tensor(real + [padding] * pad, dtype=torch.long)

        static.token_ids.copy_(values([w.tokens[0] for w in work], 0), non_blocking=True)
        static.positions.copy_(values([w.start for w in work], 0), non_blocking=True)
        static.write_rows.copy_(values(list(range(n)), scratch), non_blocking=True)
        static.lengths.copy_(values([w.start + 1 for w in work], 1), non_blocking=True)
        static.adapters.copy_(values([w.adapter for w in work], -1), non_blocking=True)

    def _prepare(self, rows: int, width: int) -> StaticDecode:
        device, scratch = self.runner.device, self.runner.kv.scratch_row

        def buffer(value: int) -> torch.Tensor:
            return torch.full((rows,), value, dtype=torch.long, device=device)

        # Until filled, every row writes to the scratch row: warming up and capturing touch no request's cache.
        static = StaticDecode(buffer(0), buffer(0), buffer(scratch), buffer(1), buffer(-1), width)
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
        logger.info("captured a decode graph", extra={"batch": static.token_ids.shape[0], "width": static.width})
