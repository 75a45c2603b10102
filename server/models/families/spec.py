"""What a model family is to loraserve: a short description of how its decoder layer differs from LLaMA's, and the
config settings the decoder runner implements for it. Plain data (no torch, no transformers), so that the families
can be listed and checked before anything heavy is imported.

A config is served only when every setting the family names has a value the runner implements; anything else is
refused by name (`check`), never approximated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# The rotary embeddings whose frequencies depend on the position alone. "dynamic" and "longrope" pick their
# frequencies from the length of the whole sequence in each forward pass, which a paged cache filled chunk by chunk
# cannot follow: the same position would be rotated differently depending on how the prompt was split.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
MISSING = object()  # a setting the config does not have


@dataclass(frozen=True)
class Setting:
    """One config field and what the runner implements of it: `allowed` values (a field the config lacks reads as
    MISSING), or a predicate. `what` names the feature in the refusal."""

    key: str
    allowed: tuple[Any, ...] = ()
    accepts: Callable[[Any], bool] | None = None
    what: str = ""

    def refusal(self, value: Any) -> str | None:
        """Why `value` cannot be served, or None when it can."""
        ok = self.accepts(value) if self.accepts is not None else value in self.allowed
        if ok:
            return None
        served = "" if self.accepts is not None else f"; served: {', '.join(map(_show, self.allowed))}"
        return f"{self.key}={_show(value):.80} ({self.what}{served})"


def _show(value: Any) -> str:
    return "unset" if value is MISSING else repr(value)


@dataclass(frozen=True)
class Family:
    """A decoder-only family the runner serves. Every field but the first three has LLaMA's value by default."""

    model_type: str  # config.model_type
    architecture: str  # the class AutoModelForCausalLM builds for it, e.g. "LlamaForCausalLM"
    norm_class: str  # its RMSNorm module's class name (the native kernel computes exactly that module's formula)
    # The projections that read the same input, as the checkpoint names them: three (or two) that the runner fuses
    # into one matmul, or one that the checkpoint already stores fused (Phi-3's qkv_proj, gate_up_proj).
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    activation_key: str = "hidden_act"  # the config field naming the gated MLP's activation
    activations: frozenset[str] = frozenset({"silu"})
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1: the norm multiplies by (1 + weight)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k (self_attn.q_norm, k_norm) before RoPE
    # Gemma 2: the attention and MLP outputs are normed too (post_attention_layernorm after attention, then
    # pre_/post_feedforward_layernorm around the MLP); LLaMA's post_attention_layernorm is the MLP's input norm.
    sandwich_norms: bool = False
    query_scale_key: str | None = None  # a config field s: scores are scaled by s**-0.5 instead of head_dim**-0.5
    attention_softcap_key: str | None = None  # a config field c: scores become c * tanh(scores / c)
    final_softcap_key: str | None = None  # the same on the output logits
    # Where sliding windows come from, as the family's transformers code reads them: nowhere (LLaMA ignores
    # sliding_window and layer_types), every layer has config.sliding_window (Mistral, Phi-3), or the layers whose
    # config.layer_types entry is "sliding_attention" (Qwen2, Qwen3, Gemma 2)
    windows: Literal["none", "all_layers", "layer_types"] = "none"
    settings: tuple[Setting, ...] = ()  # the family's own config fields the runner implements only some values of

    def all_settings(self) -> tuple[Setting, ...]:
        """The family's settings, those every family shares, and its window where it reads one."""
        shared = (
            Setting(self.activation_key, tuple(sorted(self.activations)), what="the MLP's activation"),
            Setting("rope_type", tuple(sorted(STATIC_ROPE_TYPES)), what="the rotary embedding's scaling"),
            Setting("partial_rotary_factor", (1.0, None, MISSING), what="rotary embedding over part of each head"),
            Setting("layer_types", accepts=_known_layer_types, what=f"only {FULL_ATTENTION} and {SLIDING_ATTENTION}"),
            Setting("is_encoder_decoder", (False, MISSING), what="encoder-decoder models"),
            # transformers' masks read it: False makes attention bidirectional (embedding-model conversions)
            Setting("is_causal", (True, MISSING), what="bidirectional attention"),
        )
        if self.windows != "none":
            shared += (Setting("sliding_window", accepts=window_or_unset, what="a positive number of positions"),)
        return shared + self.settings


def positive(value: Any) -> bool:
    """A finite number above zero (a scale or a soft cap)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")


def positive_or_unset(value: Any) -> bool:
    return value is None or value is MISSING or positive(value)


def window_or_unset(value: Any) -> bool:
    """A sliding window: a positive whole number of positions, or none."""
    return value is None or value is MISSING or (type(value) is int and value > 0)


def _known_layer_types(value: Any) -> bool:
    return value is MISSING or value is None or set(value) <= {FULL_ATTENTION, SLIDING_ATTENTION}


def config_values(config: Any) -> dict[str, Any]:
    """A transformers config's settings as the checks read them, with the rotary fields flattened out of
    rope_parameters."""
    values = config.to_dict()
    rope = values.get("rope_parameters") or {}
    if rope and all(isinstance(v, Mapping) for v in rope.values()):
        values["rope_type"] = f"per layer type ({', '.join(sorted(rope))})"  # refused: one rope per layer type
    elif isinstance(rope, Mapping):
        values["rope_type"] = rope.get("rope_type", "default")
        if rope.get("partial_rotary_factor") not in (None, 1.0):  # beside a top-level one: either one counts
            values["partial_rotary_factor"] = rope["partial_rotary_factor"]
    return values


def refusals(family: Family, config: Any) -> list[str]:
    """Every setting of `config` the runner does not implement for `family`; empty when it serves it."""
    values = config_values(config)
    found = (s.refusal(values.get(s.key, MISSING)) for s in family.all_settings())
    return [reason for reason in found if reason is not None]
