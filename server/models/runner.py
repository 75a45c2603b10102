"""The seam between the engine and a model: what the engine asks of a model runner, whatever the architecture."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from loraserve.server.models.types import RowWork

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from loraserve.server.models.kv_blocks import CacheShape, PagedKVCache
    from loraserve.server.models.lora import LoraBanks
    from loraserve.server.models.native import NativeKernels

Linear = Callable[["torch.Tensor"], "torch.Tensor"]


class ModelRunner(Protocol):
    """Runs engine steps on one loaded model over a paged KV cache. Only the engine thread calls it."""

    device: torch.device
    kv: PagedKVCache
    lora: LoraBanks | None  # the resident adapters' banks; the engine replaces them between steps

    def step(self, work: Sequence[RowWork]) -> torch.Tensor:
        """Feed every work item's tokens; return the next-token logits [R, V] of the items that want them."""
        ...

    def decode(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        adapters: torch.Tensor,
    ) -> torch.Tensor:
        """A decode-only step with fixed shapes, for CUDA graphs: one token per row; returns logits [B, V]."""
        ...


class ModelRunnerClass(Protocol):
    """What the registry knows of a runner before a model is loaded into it."""

    def __call__(
        self,
        model: PreTrainedModel,
        linears: dict[tuple[int, str], Linear],
        kv_cache: PagedKVCache,
        lora: LoraBanks | None,
        kernels: NativeKernels | None = None,
    ) -> ModelRunner: ...

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Raise ConfigError for a variant of the architecture the runner does not implement."""

    @staticmethod
    def prepare_linears(model: PreTrainedModel) -> dict[tuple[int, str], Linear]:
        """Every projection and the LM head, ready for the runner (prepacked where that pays)."""
        ...

    @staticmethod
    def cache_shape(model: PreTrainedModel, dtype: torch.dtype) -> CacheShape:
        """What the KV cache stores per token for this model."""
        ...

    @staticmethod
    def projection_features(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection an adapter may change."""
        ...
