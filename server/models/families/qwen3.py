"""Qwen3: Qwen2's layer plus an RMSNorm over each head of q and k before RoPE."""

from loraserve.server.models.families.spec import Family

QWEN3 = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    norm_class="Qwen3RMSNorm",
    qk_norm=True,
    windows="layer_types",
)
