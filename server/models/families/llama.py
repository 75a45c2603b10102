"""Llama 2 and Llama 3.x (with the llama3 rotary scaling of 3.1 and later): the reference layer every default of
Family describes. Projection biases (attention_bias, mlp_bias) live in the linear layers and need nothing here."""

from loraserve.server.models.families.spec import Family

LLAMA = Family(model_type="llama", architecture="LlamaForCausalLM", norm_class="LlamaRMSNorm")
