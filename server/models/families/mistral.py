"""Mistral: LLaMA's layer, with config.sliding_window (when set) on every layer."""

from loraserve.server.models.families.spec import Family

MISTRAL = Family(
    model_type="mistral", architecture="MistralForCausalLM", norm_class="MistralRMSNorm", windows="all_layers"
)
