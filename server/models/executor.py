"""The model side as the engine sees it: one object that owns the KV cache, the native kernels, CUDA graphs, the
LoRA banks and the decoder runner, and runs steps. The engine schedules and accounts in blocks and rows; it never
builds or touches model-side state (tests/test_layering.py holds it to that).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from loraserve.config import EngineConfig, parse_size
from loraserve.errors import ConfigError
from loraserve.server.models import native
from loraserve.server.models.adapters.banks import LoraBanks
from loraserve.server.models.adapters.files import LoraAdapter
from loraserve.server.models.adapters.spec import AdapterSpec
from loraserve.server.models.cuda_graphs import DecodeGraphs
from loraserve.server.models.decoder import DecoderRunner, cache_shape, projection_features
from loraserve.server.models.kv_blocks import PagedKVCache, budget_bytes
from loraserve.server.models.loading import LoadedModel, read_adapter_from
from loraserve.server.models.types import RowWork

logger = logging.getLogger(__name__)


class ModelExecutor:
    """Runs the engine's steps on one loaded model. forward and use_adapters run on the engine thread only;
    read_adapter on any thread."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self._model = loaded.model
        self.kv = self._kv_cache(config)
        kernels = native.select(config.kernels, self.kv.shape, self._model.device)
        self.runner = DecoderRunner(self._model, loaded.linears, self.kv, None, kernels)
        self._graphs: DecodeGraphs | None = None
        if config.cuda_graphs and self.device.type == "cuda" and loaded.description.quantization == "none":
            self._graphs = DecodeGraphs(self.runner, config.max_batch_size, capture=True)

    def _kv_cache(self, config: EngineConfig) -> PagedKVCache:
        model = self._model
        size = budget_bytes(parse_size(config.kv_cache_memory), model.device)
        try:
            kv = PagedKVCache.within(cache_shape(model, model.dtype), size, config.kv_block_size, model.device)
        except ValueError as error:
            raise ConfigError(f"--kv-cache-memory {config.kv_cache_memory}: {error}") from None
        logger.info(
            "KV cache",
            extra={"bytes": size, "blocks": kv.num_blocks, "block_size": kv.block_size, "tokens": kv.capacity_tokens},
        )
        return kv

    @property
    def device(self) -> torch.device:
        """Where the logits are, and so where sampling's inputs go."""
        return self._model.device

    @property
    def block_size(self) -> int:
        """Positions per KV cache block."""
        return self.kv.block_size

    @property
    def usable_blocks(self) -> int:
        """The KV cache blocks the engine may hand to sequences."""
        return self.kv.usable_blocks

    @property
    def capacity_tokens(self) -> int:
        """The positions the KV cache holds in all."""
        return self.kv.capacity_tokens

    def forward(self, work: Sequence[RowWork]) -> torch.Tensor:
        """One step: the next-token logits [R, V] of the work items that want them, in their order. A decode-only
        step runs through a captured CUDA graph where one applies."""
        logits = self._graphs.step(work) if self._graphs is not None else None
        return logits if logits is not None else self.runner.step(work)

    def read_adapter(self, spec: AdapterSpec, cache: Path, version: str | None, where: str) -> LoraAdapter:
        """Read and check an adapter against this model (file and network I/O: call it off the engine thread)."""
        return read_adapter_from(spec, self._model, cache, version, where)

    def use_adapters(self, resident: Sequence[LoraAdapter]) -> dict[str, int]:
        """Make `resident` the adapters the model runs; returns each one's index, which RowWork.adapter names.
        The banks are built before anything is replaced, so a failure (out of memory) leaves the running set."""
        model = self._model
        banks = None
        if resident:
            features = projection_features(model)
            banks = LoraBanks(list(resident), features, model.config.num_hidden_layers, model.dtype, model.device)
        self.runner.lora = banks
        if self._graphs is not None:
            self._graphs.invalidate()  # captured graphs read the old banks
        return banks.index if banks is not None else {}
