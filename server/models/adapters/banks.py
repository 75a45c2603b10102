"""LoRA for the batch: the resident adapters applied to any mix of tokens in two matmuls per projection.

For each adapted projection, every resident adapter's A and B matrices are stacked side by side (ranks padded to the
largest, scaling folded into B): `lora(x) = ((x @ A_all) * rows) @ B_all`, where `rows` keeps, for each token, only
the block of its own adapter (all zeros for the base model). The shapes do not depend on which adapters a batch
mixes, so one kernel sequence serves every batch (and a captured CUDA graph stays valid), and the cost is that of a
rank of (adapters x r): small next to the projection itself. This is the idea of Punica's SGMV / S-LoRA, done with
dense matmuls because the number of resident adapters is small.
"""

from __future__ import annotations

import torch

from loraserve.server.models.adapters.files import LoraAdapter, LoraDelta


class LoraBank:
    """Every resident adapter's delta for one projection, stacked: A_all [in, n*r], B_all [n*r, out]."""

    def __init__(
        self,
        deltas: list[LoraDelta | None],
        rank: int,
        features: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        in_features, out_features = features
        self.rank = rank
        self.a_all = torch.zeros(in_features, len(deltas) * rank, dtype=dtype)
        self.b_all = torch.zeros(len(deltas) * rank, out_features, dtype=dtype)
        for i, delta in enumerate(deltas):
            if delta is None:  # this adapter leaves the projection alone
                continue
            r = delta.a.shape[0]
            self.a_all[:, i * rank : i * rank + r] = delta.a.T.to(dtype)
            self.b_all[i * rank : i * rank + r] = (delta.b.T.float() * delta.scaling).to(dtype)
        self.a_all, self.b_all = self.a_all.to(device), self.b_all.to(device)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x: [T, in]; rows: [T, n*r], 1 on each token's adapter block. Returns the update [T, out]."""
        return ((x @ self.a_all) * rows) @ self.b_all


class LoraBanks:
    """The banks of every adapted projection of the model, and the per-token masks that select adapters."""

    def __init__(
        self,
        adapters: list[LoraAdapter],
        features: dict[str, tuple[int, int]],
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.adapters = adapters
        self.index = {a.info.id: i for i, a in enumerate(adapters)}
        self.banks: dict[tuple[int, str], LoraBank] = {}
        keys = sorted({key for a in adapters for key in a.deltas})
        for layer, projection in keys:
            deltas = [a.deltas.get((layer, projection)) for a in adapters]
            rank = max(d.a.shape[0] for d in deltas if d is not None)
            self.banks[(layer, projection)] = LoraBank(deltas, rank, features[projection], dtype, device)
        self.ranks = sorted({bank.rank for bank in self.banks.values()})
        self.dtype = dtype
        self.device = device

    def __bool__(self) -> bool:
        return bool(self.banks)

    def row_masks(self, adapter_per_token: torch.Tensor) -> dict[int, torch.Tensor]:
        """For each bank rank r: [T, n*r] with ones on each token's adapter block. adapter_per_token: [T], -1 = base."""
        masks = {}
        n = len(self.adapters)
        for rank in self.ranks:
            block = torch.arange(n * rank, device=self.device) // rank  # [n*r]: which adapter each column serves
            masks[rank] = (block[None, :] == adapter_per_token[:, None]).to(self.dtype)
        return masks

    def get(self, layer: int, projection: str) -> LoraBank | None:
        return self.banks.get((layer, projection))
