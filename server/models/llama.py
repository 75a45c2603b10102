"""The LLaMA-family model runner: decode tokens and prompt chunks of a step packed into one token batch, with
per-token LoRA adapters and the paged KV cache.

The weights stay in the Hugging Face modules (so quantized and fused linear layers work unchanged, and RMSNorm and
RoPE are exactly transformers'); only the loop over layers and the attention are ours. All tokens of a step go
through every projection together, whatever request or phase they belong to. Attention is the only per-request
part: decode tokens attend together over their gathered blocks in one call, each prompt chunk over its own blocks.

Where the projections are plain linear layers, q, k and v run as one (QKV_PROJ) and RoPE turns q and k in one pass:
at decode batch sizes an op's fixed cost is a large share of its time (measured: one fused projection 0.20 ms against
0.26 ms for the three at 32 rows; the whole 32-row decode step 7% faster with the grouped decode attention below).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

from loraserve.errors import ConfigError
from loraserve.server.models import cpu_linear
from loraserve.server.models.kv_blocks import SCRATCH_BLOCK, CacheShape, PagedKVCache
from loraserve.server.models.lora import LoraBanks
from loraserve.server.models.native import NativeKernels
from loraserve.server.models.runner import Linear
from loraserve.server.models.types import RowWork

# attend(layer, q [T, heads, head_dim]) -> context [T, heads, head_dim], reading the layer's keys and values from the
# cache (the step's own keys and values are already written there)
Attention = Callable[[int, torch.Tensor], torch.Tensor]
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Projections of a layer that read the same input, as one linear layer each (outputs side by side), where
# prepare_linears fuses them: q, k and v; gate and up
QKV_PROJ, GATE_UP_PROJ = "qkv_proj", "gate_up_proj"
FUSED_PROJECTIONS = {QKV_PROJ: ("q_proj", "k_proj", "v_proj"), GATE_UP_PROJ: ("gate_proj", "up_proj")}
# The RMSNorm modules whose forward the native rms_norm computes (weight * x / sqrt(mean(x^2) + eps))
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
# oneDNN picks its blocking for this batch size; measured fine from 1 to 512 rows.
PACKING_BATCH_HINT = 32


@dataclass(frozen=True)
class PackedStep:
    """A step's tokens packed into one batch: the single-token work first, then prompt chunks."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T]: where each token's key and value go in the cache
    adapters: torch.Tensor  # [T]: each token's adapter, -1 for the base model
    single_tables: torch.Tensor  # [S, n]: block tables of the single-token work, padded with the scratch block
    single_lengths: torch.Tensor  # [S]: how many positions each of those sequences attends
    single_mask: torch.Tensor | None  # [S, 1, 1, n * block_size]: those positions, for the gathering path
    chunks: list[tuple[torch.Tensor, int, int, int]]  # (block table [1, n], start, length, offset into the tokens)
    logit_index: torch.Tensor  # [R]: packed index of each token whose logits are returned, in the work's order


def check_config(config: PretrainedConfig) -> None:
    """Refuse, with a clear message, LLaMA-family variants this runner does not implement."""
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("--model: sliding-window attention is not supported")


def prepare_linears(model: PreTrainedModel) -> dict[tuple[int, str], Linear]:
    """Every projection of every layer, and the LM head at (-1, "lm_head"). Where all are plain linear layers, each
    layer's q, k and v projections become one at QKV_PROJ, its gate and up projections one at GATE_UP_PROJ, and on a
    CPU every one is prepacked for oneDNN.

    Fusing and packing copy weights, so the plain projection weights are dropped afterwards: from here on the model
    runs only through LlamaRunner. (The LM head keeps its weight, which the embedding usually shares.)
    """
    modules: dict[tuple[int, str], Linear] = {(-1, "lm_head"): model.lm_head}
    for index, layer in enumerate(model.model.layers):
        modules |= {(index, name): getattr(layer.self_attn, name) for name in ATTENTION_PROJECTIONS}
        modules |= {(index, name): getattr(layer.mlp, name) for name in MLP_PROJECTIONS}
    if not all(type(m) is torch.nn.Linear for m in modules.values()):
        return modules
    for index in range(len(model.model.layers)):
        for fused, names in FUSED_PROJECTIONS.items():
            parts = [modules.pop((index, name)) for name in names]
            modules[(index, fused)] = fused_linear(parts)
            for part in parts:
                drop_weight(part)
    if not cpu_linear.available(model.device, model.dtype):
        return modules
    packed: dict[tuple[int, str], Linear] = {}
    for key, module in modules.items():
        packed[key] = cpu_linear.PackedLinear(module, PACKING_BATCH_HINT)
        if key[0] >= 0:
            drop_weight(module)
    return packed


def fused_linear(parts: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer whose output is the parts' outputs side by side."""
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = parts[0].bias is not None
    # skip_init: no random initialisation of weights that are replaced at once (seconds for a 7B model's layers)
    fused = torch.nn.utils.skip_init(
        torch.nn.Linear, weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype
    )
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = torch.nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def drop_weight(module: torch.nn.Linear) -> None:
    module.weight = torch.nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaRunner:
    """Runs steps of the engine on a LLaMA-family model (llama, mistral, qwen2). Only the engine thread calls it."""

    def __init__(
        self,
        model: PreTrainedModel,
        linears: dict[tuple[int, str], Linear],
        kv_cache: PagedKVCache,
        lora: LoraBanks | None,
        kernels: NativeKernels | None = None,
    ) -> None:
        check_config(model.config)
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
        # The native kernels where the model's own modules compute what they do; PyTorch ops elsewhere.
        self.kernels = kernels
        norms = [
            self.decoder.norm,
            *(m for layer in self.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)),
        ]
        self._native_norms = kernels is not None and all(type(m).__name__ in RMS_NORMS for m in norms)
        self._native_swiglu = kernels is not None and config.hidden_act == "silu"
        self._out_features = {name: out for name, (_, out) in self.projection_features(model).items()}

    check_config = staticmethod(check_config)
    prepare_linears = staticmethod(prepare_linears)

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
        singles = [w for w in work if len(w.tokens) == 1]
        chunks = [w for w in work if len(w.tokens) > 1]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        adapters: list[int] = []
        last_index: dict[int, int] = {}  # id(work item) -> packed index of its last token
        chunk_spans = []
        for w in [*singles, *chunks]:
            offset = len(token_ids)
            token_ids.extend(w.tokens)
            positions.extend(range(w.start, w.end))
            slots.extend(self.kv.slot(w.blocks, p) for p in range(w.start, w.end))
            adapters.extend([w.adapter] * len(w.tokens))
            last_index[id(w)] = len(token_ids) - 1
            if len(w.tokens) > 1:
                table = self.tensor([self._table(w)])
                chunk_spans.append((table, w.start, len(w.tokens), offset))
        width = max((self.kv.blocks_for(w.end) for w in singles), default=0)
        tables = [self._table(w) for w in singles]
        single_tables = self.tensor([t + [SCRATCH_BLOCK] * (width - len(t)) for t in tables]).view(len(singles), width)
        single_lengths = self.tensor([w.end for w in singles])
        return PackedStep(
            token_ids=self.tensor(token_ids),
            positions=self.tensor(positions),
            slots=self.tensor(slots),
            adapters=self.tensor(adapters),
            single_tables=single_tables,
            single_lengths=single_lengths,
            single_mask=self._gather_mask(single_tables, single_lengths),
            chunks=chunk_spans,
            logit_index=self.tensor([last_index[id(w)] for w in work if w.wants_logits]),
        )

    def _table(self, w: RowWork) -> list[int]:
        """The blocks that hold w's positions after this step."""
        return list(w.blocks[: self.kv.blocks_for(w.end)])

    def tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _gather_mask(self, tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """decode_mask where decode attention gathers; None where the native kernel reads the blocks in place."""
        return None if self.kernels is not None else self.decode_mask(tables, lengths)

    def decode_mask(self, tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Which gathered positions each single-token row attends, built once for all layers. tables: [S, n] block
        ids; lengths: [S] positions each row attends. Returns [S, 1, 1, n * block_size] (True: attend)."""
        width = tables.shape[1] * self.kv.block_size
        return (torch.arange(width, device=tables.device)[None, :] < lengths[:, None])[:, None, None, :]

    # ---- the forward pass ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, work: Sequence[RowWork]) -> torch.Tensor:
        """Run one step; return the next-token logits [R, V] of the work items that want them, in their order."""
        step = self.pack(work)
        return self.run_layers(
            step.token_ids,
            step.positions,
            step.slots,
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
        slots: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        adapters: torch.Tensor,
    ) -> torch.Tensor:
        """A decode-only step with fixed shapes (so it can be captured in a CUDA graph).

        token_ids, positions, slots, lengths, adapters: [B]; tables: [B, n]. Padded rows write to the scratch block
        and attend one position. Returns logits [B, V]."""
        attend = partial(
            self._decode_attention, tables=tables, lengths=lengths, mask=self._gather_mask(tables, lengths)
        )
        return self.run_layers(token_ids, positions, slots, adapters, attend, None)

    def run_layers(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        adapters: torch.Tensor,
        attend: Attention,
        logit_index: torch.Tensor | None,
        uses_lora: bool = True,
    ) -> torch.Tensor:
        """Embed, run every layer (writing each token's key and value at its cache slot, then `attend`), and return
        the logits of the tokens at logit_index (all tokens when None). All inputs: [T].
        uses_lora=False skips the adapters when no token has one."""
        hidden = self.decoder.embed_tokens(token_ids)  # [T, hidden]
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])  # [1, T, head_dim] each
        cos, sin = cos[0], sin[0]  # [T, head_dim]
        lora_rows = self.lora.row_masks(adapters) if self.lora and uses_lora else {}
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, lora_rows, slots, attend)
        last = hidden if logit_index is None else hidden[logit_index]
        return self.linears[(-1, "lm_head")](self._norm(self.decoder.norm, last)).float()  # [R, V]

    def _project_together(
        self, index: int, fused_name: str, x: torch.Tensor, lora_rows: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """The projections of FUSED_PROJECTIONS[fused_name] side by side, each with its adapters: [T, sum of their
        out_features]. One matmul where prepare_linears fused them."""
        names = FUSED_PROJECTIONS[fused_name]
        fused = self.linears.get((index, fused_name))
        if fused is None:
            return torch.cat([self._project(index, name, x, lora_rows) for name in names], -1)
        out = fused(x)
        if lora_rows:
            sizes = [self._out_features[name] for name in names]
            for name, part in zip(names, out.split(sizes, -1), strict=True):
                bank = self.lora.get(index, name)
                if bank is not None:
                    part.add_(bank(x, lora_rows[bank.rank]))
        return out

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
        slots: torch.Tensor,
        attend: Attention,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        x = self._norm(layer.input_layernorm, hidden)
        qkv = self._project_together(index, QKV_PROJ, x, lora_rows)
        qkv = qkv.view(tokens, self.num_heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = self._rotate(qkv, cos, sin)
        self.kv.write(index, slots, k, v)
        context = attend(index, q)  # [T, heads, head_dim]
        hidden = hidden + self._project(index, "o_proj", context.reshape(tokens, -1), lora_rows)
        x = self._norm(layer.post_attention_layernorm, hidden)
        gate_up = self._project_together(index, GATE_UP_PROJ, x, lora_rows)  # [T, 2 * intermediate]
        if self._native_swiglu:
            activated = self.kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, -1)
            activated = layer.mlp.act_fn(gate) * up
        return hidden + self._project(index, "down_proj", activated, lora_rows)

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._native_norms:
            return self.kernels.rms_norm(x, module.weight, module.variance_epsilon)
        return module(x)

    def _rotate(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE on q and k at once; returns q, k and v. qkv: [T, heads + 2 * kv_heads, head_dim] (contiguous); cos,
        sin: [T, head_dim]."""
        rotated = self.num_heads + self.kv_heads
        if self.kernels is not None:
            self.kernels.rope_(qkv, cos, sin, rotated)  # in place: qkv is this step's own projection output
            qk = qkv
        else:
            qk = qkv[:, :rotated]
            qk = qk * cos[:, None] + rotate_half(qk) * sin[:, None]  # broadcast over heads
        return qk[:, : self.num_heads], qk[:, self.num_heads : rotated], qkv[:, rotated:]

    def _mixed_attention(self, layer: int, q: torch.Tensor, step: PackedStep) -> torch.Tensor:
        singles = step.single_tables.shape[0]
        if not step.chunks:
            return self._decode_attention(layer, q, step.single_tables, step.single_lengths, step.single_mask)
        context = q.new_empty(q.shape)
        if singles:
            context[:singles] = self._decode_attention(
                layer, q[:singles], step.single_tables, step.single_lengths, step.single_mask
            )
        for table, start, length, offset in step.chunks:
            keys, values = self.kv.gather(layer, table)
            context[offset : offset + length] = self._chunk_attention(q[offset : offset + length], keys, values, start)
        return context

    def _decode_attention(
        self, layer: int, q: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One query per sequence, all at once. q: [S, heads, head_dim]; tables: [S, n]; lengths: [S]; mask:
        decode_mask(tables, lengths), or None when the native kernel reads the blocks in place.

        Gathering, the query heads that share a key-value head go in as that head's rows of queries (a decode query
        attends every cached position, so no causal order among them): one attention per key-value head instead of
        repeating keys and values per query head (measured 10% faster than enable_gqa on a CPU)."""
        if mask is None:
            return self.kernels.decode_attention(q, *self.kv.pools(layer), tables, lengths)
        keys, values = self.kv.gather(layer, tables)  # [S, kv_heads, n * block_size, head_dim]
        rows = q.shape[0]
        grouped = q.reshape(rows, self.kv_heads, self.num_heads // self.kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return out.reshape(rows, self.num_heads, self.head_dim)

    @staticmethod
    def _chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """A prompt chunk at positions [start, start + n) attends causally over its sequence. q: [n, heads, head_dim];
        keys, values: [1, kv_heads, >= start + n, head_dim]."""
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
