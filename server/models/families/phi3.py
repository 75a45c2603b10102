"""Phi-3: LLaMA's layer with q, k and v stored as one qkv_proj and gate and up as one gate_up_proj (so adapters
target those names), and config.sliding_window on every layer."""

from loraserve.server.models.families.spec import Family

PHI3 = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    norm_class="Phi3RMSNorm",
    qkv=("qkv_proj",),
    gate_up=("gate_up_proj",),
    windows="all_layers",
)
