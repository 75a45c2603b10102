"""The model's forward pass for a batch of requests at different stages: decode tokens and prompt chunks packed into
one token batch, with per-token LoRA adapters and the slot KV cache.

The weights stay in the Hugging Face modules (so quantized and fused linear layers work unchanged, and RMSNorm and
RoPE are exactly transformers'); only the loop over layers and the attention are ours. All tokens of a step go
through every projection together, whatever request or phase they belong to. Attention is the only per-request
part: decode tokens attend together over the cache rows in one call, each prompt chunk attends over its own row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from loraserve.errors import ConfigError
from loraserve.server import cpu_linear
from loraserve.server.kv_cache import CacheShape, KVCache
from loraserve.server.lora import LoraBanks

# attend(q [T, heads, head_dim], keys, values [rows, kv_heads, width, head_dim]) -> context [T, heads, head_dim]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

Linear = Callable[[torch.Tensor], torch.Tensor]
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# oneDNN picks its blocking for this batch size; measured fine from 1 to 512 rows.
PACKING_BATCH_HINT = 32

# Architectures whose decoder layers are LLaMA's: pre-norm, RoPE, GQA attention, gated MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RowWork:
    """One request's share of a step: tokens to feed at positions start, start+1, ... of its cache row."""

    row: int
    tokens: Sequence[int]
    start: int
    adapter: int = -1  # index of the request's adapter among the resident ones; -1 for the base model
    wants_logits: bool = True  # False for a prompt chunk that does not end the prompt


@dataclass(frozen=True)
class PackedStep:
    """A step's tokens packed into one batch: the single-token rows first (sorted by row), then prompt chunks."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    rows: torch.Tensor  # [T]: each token's cache row
    adapters: torch.Tensor  # [T]: each token's adapter, -1 for the base model
    single_rows: torch.Tensor  # [S]: cache rows of the single-token work, ascending
    single_lengths: list[int]  # cached length of those rows after this step
    chunks: list[tuple[int, int, int, int]]  # (row, start, length, offset into the packed tokens)
    logit_index: torch.Tensor  # [R]: packed index of each token whose logits are returned, in the work's order


def check_supported(model: PreTrainedModel) -> None:
    """Refuse, with a clear message, architectures whose layers this runner does not implement."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"--model: a {config.model_type!r} model ({type(model).__name__}); loraserve serves LLaMA-family "
            f"decoders: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("--model: sliding-window attention is not supported")


def prepare_linears(model: PreTrainedModel) -> dict[tuple[int, str], Linear]:
    """Every projection of every layer, and the LM head at (-1, "lm_head"); on a CPU, prepacked for oneDNN.

    Packing copies a weight, so the plain projection weights are dropped afterwards: from here on the model runs
    only through LlamaRunner. (The LM head keeps its weight, which the embedding usually shares.)
    """
    modules: dict[tuple[int, str], Linear] = {(-1, "lm_head"): model.lm_head}
    for index, layer in enumerate(model.model.layers):
        modules |= {(index, name): getattr(layer.self_attn, name) for name in ATTENTION_PROJECTIONS}
        modules |= {(index, name): getattr(layer.mlp, name) for name in MLP_PROJECTIONS}
    plain = all(type(m) is torch.nn.Linear for m in modules.values())
    if not plain or not cpu_linear.available(model.device, model.dtype):
        return modules
    packed: dict[tuple[int, str], Linear] = {}
    for key, module in modules.items():
        packed[key] = cpu_linear.PackedLinear(module, PACKING_BATCH_HINT)
        if key[0] >= 0:
            module.weight = torch.nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
    return packed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaRunner:
    """Runs steps of the engine on a LLaMA-family model. Only the engine thread calls it."""

    def __init__(
        self, model: PreTrainedModel, linears: dict[tuple[int, str], Linear], kv_cache: KVCache, lora: LoraBanks | None
    ) -> None:
        check_supported(model)
        config = model.config
        self.model = model
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.linears = linears
        self.kv = kv_cache
        self.lora = lora if lora else None
        self.device = model.device
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def cache_shape(model: PreTrainedModel, dtype: torch.dtype) -> CacheShape:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return CacheShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype)

    @staticmethod
    def projection_features(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
        """Each adaptable projection's (in_features, out_features), read from layer 0."""
        layer = model.model.layers[0]
        modules = {name: getattr(layer.self_attn, name) for name in ATTENTION_PROJECTIONS}
        modules |= {name: getattr(layer.mlp, name) for name in MLP_PROJECTIONS}
        return {name: (m.in_features, m.out_features) for name, m in modules.items()}

    # ---- packing -------------------------------------------------------------------------------------------------

    def pack(self, work: Sequence[RowWork]) -> PackedStep:
        singles = sorted((w for w in work if len(w.tokens) == 1), key=lambda w: w.row)
        chunks = [w for w in work if len(w.tokens) > 1]
        token_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        adapters: list[int] = []
        last_index: dict[int, int] = {}
        chunk_spans = []
        for w in [*singles, *chunks]:
            offset = len(token_ids)
            token_ids.extend(w.tokens)
            positions.extend(range(w.start, w.start + len(w.tokens)))
            rows.extend([w.row] * len(w.tokens))
            adapters.extend([w.adapter] * len(w.tokens))
            last_index[w.row] = len(token_ids) - 1
            if len(w.tokens) > 1:
                chunk_spans.append((w.row, w.start, len(w.tokens), offset))

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return PackedStep(
            token_ids=tensor(token_ids),
            positions=tensor(positions),
            rows=tensor(rows),
            adapters=tensor(adapters),
            single_rows=tensor([w.row for w in singles]),
            single_lengths=[w.start + 1 for w in singles],
            chunks=chunk_spans,
            logit_index=tensor([last_index[w.row] for w in work if w.wants_logits]),
        )

    # ---- the forward pass ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, work: Sequence[RowWork]) -> torch.Tensor:
        """Run one step; return the next-token logits [R, V] of the work items that want them, in their order."""
        step = self.pack(work)
        return self.run_layers(
            step.token_ids,
            step.positions,
            step.rows,
            step.adapters,
            partial(self._mixed_attention, step=step),
            step.logit_index,
            uses_lora=any(w.adapter >= 0 for w in work),
        )

    @torch.inference_mode()
    def decode(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        write_rows: torch.Tensor,
        lengths: torch.Tensor,
        adapters: torch.Tensor,
        width: int,
    ) -> torch.Tensor:
        """A decode-only step with fixed shapes (so it can be captured in a CUDA graph): query i is cache row i.

        token_ids, positions, write_rows, lengths, adapters: [B]. Rows beyond the real ones write to the scratch row
        and attend one position. Returns logits [B, V].
        """
        rows = token_ids.shape[0]
        mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]  # [B,1,1,W]

        def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            out = F.scaled_dot_product_attention(
                q[:, :, None, :], keys[:rows, :, :width], values[:rows, :, :width], attn_mask=mask, enable_gqa=True
            )
            return out[:, :, 0, :]

        return self.run_layers(token_ids, positions, write_rows, adapters, attend, None)

    def run_layers(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        write_rows: torch.Tensor,
        adapters: torch.Tensor,
        attend: Attention,
        logit_index: torch.Tensor | None,
        uses_lora: bool = True,
    ) -> torch.Tensor:
        """Embed, run every layer (writing each token's key and value at (write_rows, positions) of the cache, then
        `attend`), and return the logits of the tokens at logit_index (all tokens when None). All inputs: [T].
        uses_lora=False skips the adapters when no token has one."""
        hidden = self.decoder.embed_tokens(token_ids)  # [T, hidden]
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])  # [1, T, head_dim] each
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]: broadcast over heads
        lora_rows = self.lora.row_masks(adapters) if self.lora and uses_lora else {}
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, lora_rows, write_rows, positions, attend)
        last = hidden if logit_index is None else hidden[logit_index]
        return self.linears[(-1, "lm_head")](self.decoder.norm(last)).float()  # [R, V]

    def _project(self, index: int, name: str, x: torch.Tensor, lora_rows: dict[int, torch.Tensor]) -> torch.Tensor:
        out = self.linears[(index, name)](x)
        bank = self.lora.get(index, name) if lora_rows else None
        if bank is not None:
            out = out + bank(x, lora_rows[bank.rank])
        return out

    def _layer(
        self,
        index: int,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lora_rows: dict[int, torch.Tensor],
        write_rows: torch.Tensor,
        positions: torch.Tensor,
        attend: Attention,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        x = layer.input_layernorm(hidden)
        q = self._project(index, "q_proj", x, lora_rows).view(tokens, self.num_heads, self.head_dim)
        k = self._project(index, "k_proj", x, lora_rows).view(tokens, self.kv_heads, self.head_dim)
        v = self._project(index, "v_proj", x, lora_rows).view(tokens, self.kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = self.kv.keys(index), self.kv.values(index)  # [rows, kv_heads, width, head_dim]
        keys[write_rows, :, positions] = k
        values[write_rows, :, positions] = v
        context = attend(q, keys, values)  # [T, heads, head_dim]
        hidden = hidden + self._project(index, "o_proj", context.reshape(tokens, -1), lora_rows)
        x = layer.post_attention_layernorm(hidden)
        gate = self._project(index, "gate_proj", x, lora_rows)
        up = self._project(index, "up_proj", x, lora_rows)
        return hidden + self._project(index, "down_proj", layer.mlp.act_fn(gate) * up, lora_rows)

    def _mixed_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: PackedStep
    ) -> torch.Tensor:
        context = torch.empty_like(q)
        singles = len(step.single_lengths)
        if singles:
            context[:singles] = self._decode_attention(q[:singles], keys, values, step)
        for row, start, length, offset in step.chunks:
            context[offset : offset + length] = self._chunk_attention(
                q[offset : offset + length], keys[row : row + 1], values[row : row + 1], start
            )
        return context

    def _decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: PackedStep
    ) -> torch.Tensor:
        """One query per row, all rows at once over the compact rows [0, n) of the cache. q: [S, heads, head_dim]."""
        n = self.kv.active_rows
        width = max(step.single_lengths)
        lengths = torch.ones(n, dtype=torch.long, device=q.device)  # rows without a query attend one position
        lengths[step.single_rows] = torch.tensor(step.single_lengths, device=q.device)
        mask = (torch.arange(width, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]  # [n,1,1,W]
        dense = len(step.single_lengths) == n  # every active row decodes: rows 0..n-1 in order
        if dense:
            queries = q[:, :, None, :]  # [n, heads, 1, head_dim]
        else:
            queries = q.new_zeros(n, self.num_heads, 1, self.head_dim)
            queries[step.single_rows] = q[:, :, None, :]
        out = F.scaled_dot_product_attention(
            queries, keys[:n, :, :width], values[:n, :, :width], attn_mask=mask, enable_gqa=True
        )  # [n, heads, 1, head_dim]
        out = out[:, :, 0, :]
        return out if dense else out[step.single_rows]

    @staticmethod
    def _chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """A prompt chunk at positions [start, start + n) attends causally over its row. q: [n, heads, head_dim]."""
        n = q.shape[0]
        queries = q.transpose(0, 1)[None]  # [1, heads, n, head_dim]
        k, v = keys[:, :, : start + n], values[:, :, : start + n]
        if start == 0:
            out = F.scaled_dot_product_attention(queries, k, v, is_causal=True, enable_gqa=True)
        else:
            positions = torch.arange(start + n, device=q.device)
            mask = positions[None, :] <= (start + torch.arange(n, device=q.device))[:, None]  # [n, start+n]
            out = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1)  # [n, heads, head_dim]
