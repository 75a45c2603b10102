"""Qwen2 and Qwen2.5: LLaMA's layer with biases on q, k and v (carried by the linear layers); with
use_sliding_window, the layers config.layer_types marks attend within config.sliding_window."""

from loraserve.server.models.families.spec import Family

QWEN2 = Family(model_type="qwen2", architecture="Qwen2ForCausalLM", norm_class="Qwen2RMSNorm", windows="layer_types")
