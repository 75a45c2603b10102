"""Runs a changing batch of sequences on a Hugging Face causal LM: rows join with a left-padded prefill and leave at
any step, sharing one KV cache.

Rows are kept left-aligned to a common cache length: a row that joins (or a batch that a row joins) is padded on the
left, and the attention mask hides the padding. This is TGI's "concatenate" scheme for a model whose cache is one
tensor per layer; it works for any architecture transformers can run, with or without PEFT adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class HFBatchRunner:
    """The model's side of the engine: prefill rows into the batch, decode one token for every row, drop rows."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int, uses_adapters: bool) -> None:
        self.model = model
        self.device = model.device
        self.pad_token_id = pad_token_id
        self.uses_adapters = uses_adapters
        self.reset()

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.cache: DynamicCache | None = None
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T]
        self.next_positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]
        self.adapter_names: list[str] = []

    @property
    def size(self) -> int:
        return len(self.adapter_names)

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        adapter_names: list[str],
    ) -> torch.Tensor:
        kwargs = {"adapter_names": adapter_names} if self.uses_adapters else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1, :]  # [B, V]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], adapter_ids: Sequence[str]) -> torch.Tensor:
        """Run the prompts, append them as new rows at the end of the batch; return their next-token logits [n, V]."""
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [n, L]: padding sits at position 0
        cache = DynamicCache(config=self.model.config)
        names = [adapter or BASE_ADAPTER for adapter in adapter_ids]
        logits = self._forward(input_ids, mask, positions, cache, names)
        self._append_rows(cache, mask, mask.sum(dim=-1), names)
        return logits

    @torch.inference_mode()
    def decode(self, last_tokens: Sequence[int]) -> torch.Tensor:
        """Feed every row its last token; return the next-token logits [B, V]."""
        input_ids = torch.tensor(last_tokens, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        ones = torch.ones((self.size, 1), dtype=torch.long, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        assert self.cache is not None
        logits = self._forward(
            input_ids, self.attention_mask, self.next_positions[:, None], self.cache, self.adapter_names
        )
        self.next_positions += 1
        return logits

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not listed (finished or cancelled requests), freeing their cache."""
        if len(rows) == self.size:
            return
        if not rows:
            self.reset()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        assert self.cache is not None
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_positions = self.next_positions[index]
        self.adapter_names = [self.adapter_names[i] for i in rows]
        self._trim_left_padding()

    def _append_rows(
        self, cache: DynamicCache, mask: torch.Tensor, next_positions: torch.Tensor, names: list[str]
    ) -> None:
        if self.cache is None:
            self.cache, self.attention_mask, self.next_positions = cache, mask, next_positions
            self.adapter_names = names
            return
        width = max(self.attention_mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, dim=2), _pad_left(new.keys, width, dim=2)])
            old.values = torch.cat([_pad_left(old.values, width, dim=2), _pad_left(new.values, width, dim=2)])
        self.attention_mask = torch.cat([_pad_left(self.attention_mask, width, 1), _pad_left(mask, width, 1)])
        self.next_positions = torch.cat([self.next_positions, next_positions])
        self.adapter_names = self.adapter_names + names

    def _trim_left_padding(self) -> None:
        """Cut cache columns that are padding for every remaining row (left by a long prompt that finished)."""
        used = self.attention_mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self.attention_mask = self.attention_mask[:, first:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]  # F.pad lists pads from the last dimension backwards
    return F.pad(tensor, pad)
