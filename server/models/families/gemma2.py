"""Gemma 2: GeGLU, RMSNorm weights stored as w - 1, norms after attention and around the MLP as well as before,
scores scaled by query_pre_attn_scalar and soft-capped, logits soft-capped, and sliding windows on alternate layers.
(The embedding's sqrt(hidden_size) scale is in transformers' embedding module, which the runner calls.)"""

from loraserve.server.models.families.spec import MISSING, Family, Setting, positive, positive_or_unset

GEMMA2 = Family(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    norm_class="Gemma2RMSNorm",
    activation_key="hidden_activation",
    activations=frozenset({"gelu_pytorch_tanh"}),
    norm_offset=1.0,
    sandwich_norms=True,
    query_scale_key="query_pre_attn_scalar",
    attention_softcap_key="attn_logit_softcapping",
    final_softcap_key="final_logit_softcapping",
    windows="layer_types",
    settings=(
        Setting("use_bidirectional_attention", (False, None, MISSING), what="bidirectional attention"),
        Setting("query_pre_attn_scalar", accepts=positive, what="a positive score scale"),
        Setting("attn_logit_softcapping", accepts=positive_or_unset, what="a positive soft cap, or none"),
        Setting("final_logit_softcapping", accepts=positive_or_unset, what="a positive soft cap, or none"),
    ),
)
