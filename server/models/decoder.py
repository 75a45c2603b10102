"""The decoder runner: one forward pass for every family in `families`, over the paged KV cache, with each token's
LoRA adapter. Decode tokens and prompt chunks of a step are packed into one token batch.

The weights stay in the Hugging Face modules (so quantized and fused linear layers work unchanged, and embeddings,
norms and rotary embeddings are exactly transformers'); only the loop over layers and the attention are ours. All
tokens of a step go through every projection together, whatever request or phase they belong to. Attention is the
only per-request part: decode tokens attend together over their gathered blocks in one call, each prompt chunk over
its own blocks. What a family changes (fused checkpoint projections, q/k norms, sandwich norms, GeGLU, soft-capping,
sliding windows) is read from its Family once, here, into per-layer plans; the step itself branches on none of it
but what the family uses.

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
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from loraserve.server.models import cpu_linear
from loraserve.server.models.adapters.banks import LoraBanks
from loraserve.server.models.adapters.files import block_of
from loraserve.server.models.families import Family, family_for
from loraserve.server.models.families.spec import SLIDING_ATTENTION
from loraserve.server.models.kv_blocks import SCRATCH_BLOCK, CacheShape, PagedKVCache
from loraserve.server.models.native import NativeKernels
from loraserve.server.models.types import RowWork

Linear = Callable[[torch.Tensor], torch.Tensor]
# attend(layer, q [T, heads, head_dim]) -> context [T, heads, head_dim], reading the layer's keys and values from the
# cache (the step's own keys and values are already written there)
Attention = Callable[[int, torch.Tensor], torch.Tensor]
# The keys of the projections that read the same input, as one linear layer each (outputs side by side): fused by
# prepare_linears, or stored so in the checkpoint (Phi-3 uses these very names)
QKV_PROJ, GATE_UP_PROJ = "qkv_proj", "gate_up_proj"
# The native kernels' gated activations, by the transformers name of the activation
NATIVE_ACTIVATIONS = {"silu": "silu_mul", "gelu_pytorch_tanh": "gelu_tanh_mul"}
# oneDNN picks its blocking for this batch size; measured fine from 1 to 512 rows.
PACKING_BATCH_HINT = 32


def projection_groups(family: Family) -> dict[str, tuple[str, ...]]:
    """Each projection key of a layer and the checkpoint's projections it computes, side by side."""
    return {QKV_PROJ: family.qkv, "o_proj": ("o_proj",), GATE_UP_PROJ: family.gate_up, "down_proj": ("down_proj",)}


def layer_projections(layer: torch.nn.Module, family: Family) -> dict[str, torch.nn.Module]:
    """The checkpoint's projection modules of one decoder layer, by name (in the block adapters name them in)."""
    return {
        name: getattr(getattr(layer, block_of(name)), name)
        for group in projection_groups(family).values()
        for name in group
    }


def projection_features(model: PreTrainedModel) -> dict[str, tuple[int, int]]:
    """Each projection an adapter may change: (in_features, out_features), read from layer 0."""
    modules = layer_projections(model.model.layers[0], family_for(model.config))
    return {name: (m.in_features, m.out_features) for name, m in modules.items()}


def cache_shape(model: PreTrainedModel, dtype: torch.dtype) -> CacheShape:
    """What the KV cache stores per token for this model."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return CacheShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype)


def prepare_linears(model: PreTrainedModel) -> dict[tuple[int, str], Linear]:
    """Every projection of every layer, and the LM head at (-1, "lm_head"). Where all are plain linear layers, the
    projections of each group of projection_groups become one at the group's key, and on a CPU every one is
    prepacked for oneDNN.

    Fusing and packing copy weights, so the plain projection weights are dropped afterwards: from here on the model
    runs only through DecoderRunner. (The LM head keeps its weight, which the embedding usually shares.)
    """
    family = family_for(model.config)
    modules: dict[tuple[int, str], Linear] = {(-1, "lm_head"): model.lm_head}
    for index, layer in enumerate(model.model.layers):
        modules |= {(index, name): module for name, module in layer_projections(layer, family).items()}
    if not all(type(m) is torch.nn.Linear for m in modules.values()):
        return modules
    for index in range(len(model.model.layers)):
        for key, names in projection_groups(family).items():
            if names != (key,):
                parts = [modules.pop((index, name)) for name in names]
                modules[(index, key)] = fused_linear(parts)
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


class Norm:
    """One of the model's RMSNorm modules: its own forward, or the native kernel computing the same formula
    (weight + the family's offset, precomputed once)."""

    def __init__(self, module: torch.nn.Module, kernels: NativeKernels | None, offset: float) -> None:
        self.module = module
        self.kernels = kernels
        if kernels is not None:
            weight = module.weight.detach()
            self.weight = (weight + offset) if offset else weight
            eps = getattr(module, "variance_epsilon", None)
            self.eps = float(module.eps if eps is None else eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return self.module(x)
        if x.dim() == 2:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer runs, resolved from its family once."""

    attention_in: Norm
    attention_out: Norm | None  # Gemma 2's norm of the attention output, before the residual
    mlp_in: Norm
    mlp_out: Norm | None  # Gemma 2's norm of the MLP output, before the residual
    q_norm: Norm | None  # Qwen3's per-head norms of q and k
    k_norm: Norm | None
    window: int  # positions a token attends (itself included); 0: all


@dataclass(frozen=True)
class PackedStep:
    """A step's tokens packed into one batch: the single-token work first, then prompt chunks."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T]: where each token's key and value go in the cache
    adapters: torch.Tensor  # [T]: each token's adapter, -1 for the base model
    single_tables: torch.Tensor  # [S, n]: block tables of the single-token work, padded with the scratch block
    single_lengths: torch.Tensor  # [S]: how many positions each of those sequences attends
    single_masks: dict[int, torch.Tensor] | None  # by window: [S, 1, 1, n * block_size], for the gathering path
    chunks: list[tuple[torch.Tensor, int, int, int]]  # (block table [1, n], start, length, offset into the tokens)
    logit_index: torch.Tensor  # [R]: packed index of each token whose logits are returned, in the work's order


class DecoderRunner:
    """Runs steps of the engine on a model of any family in `families`. Only the engine thread calls it."""

    def __init__(
        self,
        model: PreTrainedModel,
        linears: dict[tuple[int, str], Linear],
        kv_cache: PagedKVCache,
        lora: LoraBanks | None,
        kernels: NativeKernels | None = None,
    ) -> None:
        config = model.config
        family = family_for(config)
        self.family = family
        self.decoder = model.model
        self.linears = linears
        self.kv = kv_cache
        self.lora = lora if lora else None
        self.device = model.device
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = cache_shape(model, model.dtype).head_dim
        self.groups = {QKV_PROJ: family.qkv, GATE_UP_PROJ: family.gate_up}  # what _project_together fuses
        self._out_features = {name: out for name, (_, out) in projection_features(model).items()}
        # The native kernels where the model's own modules compute what they do; PyTorch ops elsewhere.
        self.kernels = kernels
        layers = list(self.decoder.layers)
        norm_kernels = kernels if kernels is not None and self._norms_are(family.norm_class, layers) else None
        self.norm = Norm(self.decoder.norm, norm_kernels, family.norm_offset)
        self.plans = [self._plan(index, layer, config, norm_kernels) for index, layer in enumerate(layers)]
        self.windows = sorted({plan.window for plan in self.plans})
        activation = getattr(config, family.activation_key)
        native_activation = NATIVE_ACTIVATIONS.get(activation) if kernels is not None else None
        self._activation = ACT2FN[activation]
        self._native_activation = getattr(kernels, native_activation) if native_activation else None
        self.scale = getattr(config, family.query_scale_key) ** -0.5 if family.query_scale_key else None
        self.softcap = getattr(config, family.attention_softcap_key) if family.attention_softcap_key else None
        self.final_softcap = getattr(config, family.final_softcap_key) if family.final_softcap_key else None

    def _norms_are(self, name: str, layers: list[torch.nn.Module]) -> bool:
        """Every RMSNorm of the model is the family's own class (whose formula the native kernel computes)."""
        modules = [self.decoder.norm]
        for layer in layers:
            modules += [m for m in layer.children() if "norm" in type(m).__name__.lower()]
            modules += [m for m in layer.self_attn.children() if "norm" in type(m).__name__.lower()]
        return all(type(m).__name__ == name for m in modules)

    def _plan(self, index: int, layer: torch.nn.Module, config: object, kernels: NativeKernels | None) -> LayerPlan:
        family = self.family

        def norm(module: torch.nn.Module) -> Norm:
            return Norm(module, kernels, family.norm_offset)

        layer_types = getattr(config, "layer_types", None) or []
        marked = index < len(layer_types) and layer_types[index] == SLIDING_ATTENTION
        sliding = family.windows == "all_layers" or (family.windows == "layer_types" and marked)
        window = (getattr(config, "sliding_window", None) or 0) if sliding else 0
        if window >= config.max_position_embeddings:  # no sequence is longer: a window that never slides
            window = 0
        sandwich = family.sandwich_norms
        return LayerPlan(
            attention_in=norm(layer.input_layernorm),
            attention_out=norm(layer.post_attention_layernorm) if sandwich else None,
            mlp_in=norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm),
            mlp_out=norm(layer.post_feedforward_layernorm) if sandwich else None,
            q_norm=norm(layer.self_attn.q_norm) if family.qk_norm else None,
            k_norm=norm(layer.self_attn.k_norm) if family.qk_norm else None,
            window=int(window),
        )

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
            single_masks=self._gather_masks(single_tables, single_lengths),
            chunks=chunk_spans,
            logit_index=self.tensor([last_index[id(w)] for w in work if w.wants_logits]),
        )

    def _table(self, w: RowWork) -> list[int]:
        """The blocks that hold w's positions after this step."""
        return list(w.blocks[: self.kv.blocks_for(w.end)])

    def tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _gather_masks(self, tables: torch.Tensor, lengths: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """decode_mask for each window the layers use, where decode attention gathers; None where the native kernel
        reads the blocks in place (having checked, once for every layer, that they are the cache's)."""
        if self.kernels is not None:
            self.kernels.check_blocks(tables, lengths, self.kv.num_blocks, self.kv.block_size)
            return None
        return {window: self.decode_mask(tables, lengths, window) for window in self.windows}

    def decode_mask(self, tables: torch.Tensor, lengths: torch.Tensor, window: int = 0) -> torch.Tensor:
        """Which gathered positions each single-token row attends, built once for all layers. tables: [S, n] block
        ids; lengths: [S] positions each row attends (its last `window` of them, when window > 0). Returns
        [S, 1, 1, n * block_size] (True: attend)."""
        width = tables.shape[1] * self.kv.block_size
        positions = torch.arange(width, device=tables.device)[None, :]
        mask = positions < lengths[:, None]
        if window:
            mask &= positions >= lengths[:, None] - window
        return mask[:, None, None, :]

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
            self._decode_attention, tables=tables, lengths=lengths, masks=self._gather_masks(tables, lengths)
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
        for index, plan in enumerate(self.plans):
            hidden = self._layer(index, plan, hidden, cos, sin, lora_rows, slots, attend)
        last = hidden if logit_index is None else hidden[logit_index]
        logits = self.linears[(-1, "lm_head")](self.norm(last)).float()  # [R, V]
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _project_together(
        self, index: int, key: str, x: torch.Tensor, lora_rows: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """The projections of group `key` side by side, each with its adapters: [T, sum of their out_features].
        One matmul where prepare_linears fused them or the checkpoint stores them fused."""
        names = self.groups[key]
        fused = self.linears.get((index, key))
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
        plan: LayerPlan,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lora_rows: dict[int, torch.Tensor],
        slots: torch.Tensor,
        attend: Attention,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        x = plan.attention_in(hidden)
        qkv = self._project_together(index, QKV_PROJ, x, lora_rows)
        qkv = qkv.view(tokens, self.num_heads + 2 * self.kv_heads, self.head_dim)
        if plan.q_norm is not None:
            qkv[:, : self.num_heads] = plan.q_norm(qkv[:, : self.num_heads])
            qkv[:, self.num_heads : self.num_heads + self.kv_heads] = plan.k_norm(
                qkv[:, self.num_heads : self.num_heads + self.kv_heads]
            )
        q, k, v = self._rotate(qkv, cos, sin)
        self.kv.write(index, slots, k, v)
        context = attend(index, q)  # [T, heads, head_dim]
        out = self._project(index, "o_proj", context.reshape(tokens, -1), lora_rows)
        hidden = hidden + (plan.attention_out(out) if plan.attention_out is not None else out)
        x = plan.mlp_in(hidden)
        gate_up = self._project_together(index, GATE_UP_PROJ, x, lora_rows)  # [T, 2 * intermediate]
        if self._native_activation is not None:
            activated = self._native_activation(gate_up)
        else:
            gate, up = gate_up.chunk(2, -1)
            activated = self._activation(gate) * up
        out = self._project(index, "down_proj", activated, lora_rows)
        return hidden + (plan.mlp_out(out) if plan.mlp_out is not None else out)

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

    # ---- attention -----------------------------------------------------------------------------------------------

    def _mixed_attention(self, layer: int, q: torch.Tensor, step: PackedStep) -> torch.Tensor:
        singles = step.single_tables.shape[0]
        masks = step.single_masks
        if not step.chunks:
            return self._decode_attention(layer, q, step.single_tables, step.single_lengths, masks)
        context = q.new_empty(q.shape)
        if singles:
            context[:singles] = self._decode_attention(
                layer, q[:singles], step.single_tables, step.single_lengths, masks
            )
        for table, start, length, offset in step.chunks:
            keys, values = self.kv.gather(layer, table)
            span = slice(offset, offset + length)
            context[span] = self._chunk_attention(q[span], keys, values, start, self.plans[layer].window)
        return context

    def _decode_attention(
        self,
        layer: int,
        q: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        masks: dict[int, torch.Tensor] | None,
    ) -> torch.Tensor:
        """One query per sequence, all at once. q: [S, heads, head_dim]; tables: [S, n]; lengths: [S]; masks:
        decode_mask(tables, lengths, window) by window, or None when the native kernel reads the blocks in place.

        Gathering, the query heads that share a key-value head go in as that head's rows of queries (a decode query
        attends every cached position, so no causal order among them): one attention per key-value head instead of
        repeating keys and values per query head (measured 10% faster than enable_gqa on a CPU)."""
        window = self.plans[layer].window
        if masks is None:
            return self.kernels.decode_attention(
                q,
                *self.kv.pools(layer),
                tables,
                lengths,
                scale=self.scale,
                softcap=self.softcap or 0.0,
                window=window,
                blocks_checked=True,
            )
        keys, values = self.kv.gather(layer, tables)  # [S, kv_heads, n * block_size, head_dim]
        rows = q.shape[0]
        grouped = q.reshape(rows, self.kv_heads, self.num_heads // self.kv_heads, self.head_dim)
        out = self._attention(grouped, keys, values, masks[window])
        return out.reshape(rows, self.num_heads, self.head_dim)

    def _chunk_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int
    ) -> torch.Tensor:
        """A prompt chunk at positions [start, start + n) attends causally over its sequence (within its last
        `window` positions, when window > 0). q: [n, heads, head_dim]; keys, values: [1, kv_heads, >= start + n,
        head_dim]."""
        n = q.shape[0]
        if start + n <= window:  # the window reaches back to position 0: plain causal attention
            window = 0
        queries = q.transpose(0, 1)[None]  # [1, heads, n, head_dim]
        k, v = keys[:, :, : start + n], values[:, :, : start + n]
        if start == 0 and not window and self.softcap is None:
            out = F.scaled_dot_product_attention(queries, k, v, is_causal=True, enable_gqa=True, scale=self.scale)
        else:
            positions = torch.arange(start + n, device=q.device)[None, :]
            query_positions = (start + torch.arange(n, device=q.device))[:, None]
            mask = positions <= query_positions  # [n, start+n]
            if window:
                mask &= positions > query_positions - window
            out = self._attention(queries, k, v, mask, grouped_heads=True)
        return out[0].transpose(0, 1)  # [n, heads, head_dim]

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, grouped_heads: bool = False
    ) -> torch.Tensor:
        """softmax(q k^T * scale, soft-capped where the family caps it, where mask) v, for q [..., heads, m, d] and
        k, v [..., kv heads, n, d]: the same heads, or (grouped_heads) each key-value head shared by a group."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=grouped_heads)
        if grouped_heads:
            groups = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
        scores = (q @ k.transpose(-1, -2)) * (self.scale or self.head_dim**-0.5)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v
