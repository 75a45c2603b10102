"""Every family the decoder runner serves, against transformers' own forward pass, logit for logit: prompts fed in
chunks, sequences at different stages in one step, and single-token decode steps, over scattered KV blocks, past
the sliding windows; on PyTorch ops and on the native kernels; with an adapter on every projection beside a base
row; and greedy decoding equal to transformers' generate. Then the allow-list: every architecture without a family
and every setting a family does not implement is refused by name."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loraserve.errors import ConfigError
from loraserve.server.models import native, preflight
from loraserve.server.models.adapters.banks import LoraBanks
from loraserve.server.models.adapters.files import read_adapter
from loraserve.server.models.adapters.spec import AdapterSpec
from loraserve.server.models.decoder import (
    GATE_UP_PROJ,
    QKV_PROJ,
    DecoderRunner,
    cache_shape,
    prepare_linears,
    projection_features,
)
from loraserve.server.models.families import FAMILIES, family_for
from loraserve.server.models.families.spec import STATIC_ROPE_TYPES
from loraserve.server.models.kv_blocks import PagedKVCache
from loraserve.server.models.types import RowWork

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
WINDOW = 13  # shorter than the test sequences, and off the 16-position block boundaries
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
# case -> (model_type, config settings beyond SHAPE)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3.1": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True, "rms_norm_eps": 0.0}),
    "llama-yarn": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        },
    ),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "qwen2": ("qwen2", {}),  # q/k/v projections with biases
    "qwen2-windows": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # heads x head_dim (128) is not the hidden size (64), as in Qwen3-0.6B
    "phi3": ("phi3", {"sliding_window": WINDOW, "pad_token_id": 0}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 32,
            "sliding_window": WINDOW,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    # Gemma 2's real head width (2b, 9b, 27b) and query scale
    "gemma2-256": (
        "gemma2",
        {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": WINDOW, "attn_logit_softcapping": 50.0},
    ),
}
TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(case: str, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = CASES[case]
    config = AutoConfig.for_model(model_type, **SHAPE, **settings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def runner_for(model, kernels: str, lora: LoraBanks | None = None) -> DecoderRunner:  # type: ignore[no-untyped-def]
    shape = cache_shape(model, torch.float32)
    selected = native.select(kernels, shape, torch.device("cpu"))
    assert (selected is None) == (kernels == "torch")
    return DecoderRunner(
        model, prepare_linears(model), PagedKVCache(shape, 12, 16, torch.device("cpu")), lora, selected
    )


def test_every_family_is_tested() -> None:
    assert {model_type for model_type, _ in CASES.values()} == set(FAMILIES)


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_for_chunks_and_decode(case: str, kernels: str) -> None:
    model = tiny(case)
    torch.manual_seed(1)
    a, b = torch.randint(0, 300, (40,)).tolist(), torch.randint(0, 300, (25,)).tolist()
    with torch.inference_mode():
        expected_a = model(torch.tensor([a])).logits[0]  # [40, V]: next-token logits at every position
        expected_b = model(torch.tensor([b])).logits[0]
    runner = runner_for(tiny(case), kernels)  # a fresh copy: prepare_linears drops the plain weights on a CPU
    row_a, row_b = [7, 2, 10], [3, 8]  # scattered, interleaved blocks: nothing relies on a sequence being contiguous
    # Step 1: a's first chunk. Step 2: a's second chunk (ending its prompt prefix of 20) and b's whole prefix.
    runner.step([RowWork(row_a, a[:7], 0, wants_logits=False)])
    logits = runner.step([RowWork(row_a, a[7:20], 7), RowWork(row_b, b[:10], 0)])
    torch.testing.assert_close(logits[0], expected_a[19], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], expected_b[9], atol=1e-4, rtol=1e-4)
    # Then single tokens for both (decode), with b finishing first and a one-token "chunk" in the same step.
    for position in range(20, 40):
        work = [RowWork(row_a, (a[position],), position)]
        if position - 10 < 15:
            work.append(RowWork(row_b, (b[position - 10],), position - 10))
        logits = runner.step(work)
        torch.testing.assert_close(logits[0], expected_a[position], atol=1e-4, rtol=1e-4)
        if len(work) == 2:
            torch.testing.assert_close(logits[1], expected_b[position - 10], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["gemma2", "mistral", "qwen2-windows"])
def test_the_fixed_shape_decode_step_cuda_graphs_replay_matches_transformers(case: str) -> None:
    """decode(): the padded, bucketed step a CUDA graph captures, with windows and soft caps (run eagerly here)."""
    from loraserve.server.models.cuda_graphs import DecodeGraphs

    model = tiny(case)
    torch.manual_seed(4)
    a, b = torch.randint(0, 300, (40,)).tolist(), torch.randint(0, 300, (30,)).tolist()
    with torch.inference_mode():
        expected_a, expected_b = model(torch.tensor([a])).logits[0], model(torch.tensor([b])).logits[0]
    runner = runner_for(tiny(case), "torch")
    graphs = DecodeGraphs(runner, max_batch_size=4, capture=False)
    row_a, row_b = [5, 1, 9], [2, 7]
    runner.step([RowWork(row_a, a[:20], 0, wants_logits=False), RowWork(row_b, b[:10], 0, wants_logits=False)])
    for step in range(20):
        work = [RowWork(row_a, (a[20 + step],), 20 + step), RowWork(row_b, (b[10 + step],), 10 + step)]
        logits = graphs.step(work)
        assert logits is not None
        torch.testing.assert_close(logits[0], expected_a[20 + step], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1], expected_b[10 + step], atol=1e-4, rtol=1e-4)


def test_llama_ignores_sliding_windows_as_transformers_does() -> None:
    """transformers' Llama reads neither sliding_window nor layer_types in its forward pass (its generate's cache
    does, and then fails on this very config): a Llama config that sets them is served with full attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    windowed = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}
    config = AutoConfig.for_model("llama", **SHAPE, **windowed)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 300, (40,)).tolist()
    with torch.inference_mode():
        expected = model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
    torch.manual_seed(0)
    runner = runner_for(AutoModelForCausalLM.from_config(config).eval(), "native")
    assert [plan.window for plan in runner.plans] == [0, 0]
    torch.testing.assert_close(runner.step([RowWork([3, 6, 1], tokens, 0)])[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_decoding_equals_generate(case: str) -> None:
    model = tiny(case)
    torch.manual_seed(3)
    prompt = torch.randint(0, 300, (21,)).tolist()
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, len(prompt) :].tolist()
    runner = runner_for(tiny(case), "native")
    blocks = [4, 1, 9]
    logits = runner.step([RowWork(blocks, prompt, 0)])
    generated = [int(logits[0].argmax())]
    while len(generated) < 24:
        position = len(prompt) + len(generated) - 1
        generated.append(int(runner.step([RowWork(blocks, (generated[-1],), position)])[0].argmax()))
    assert generated == expected


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_on_every_projection_matches_peft_beside_a_base_row(tmp_path, case: str, kernels: str) -> None:  # type: ignore[no-untyped-def]
    """q, k and v run as one projection (fused here, or in the checkpoint), and gate and up as another; each one's
    LoRA update must still land on its own slice."""
    from peft import LoraConfig, get_peft_model

    model_type = CASES[case][0]
    targets = TARGETS.get(model_type, ALL_TARGETS)
    torch.manual_seed(2)
    peft_model = get_peft_model(
        tiny(case), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (12,)).tolist()
    with torch.inference_mode():
        adapted = peft_model(torch.tensor([tokens])).logits[0, -1]
        base = tiny(case)(torch.tensor([tokens])).logits[0, -1]
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the output

    runner_model = tiny(case)
    features = projection_features(runner_model)
    assert sorted(features) == sorted(targets)
    adapter = read_adapter(AdapterSpec("all", str(tmp_path)), features, SHAPE["num_hidden_layers"])
    banks = LoraBanks([adapter], features, 2, torch.float32, torch.device("cpu"))
    runner = runner_for(runner_model, kernels, banks)
    assert (0, QKV_PROJ) in runner.linears and (0, GATE_UP_PROJ) in runner.linears
    assert (0, "k_proj") not in runner.linears and (0, "up_proj") not in runner.linears
    logits = runner.step([RowWork([1], tokens, 0, adapter=0), RowWork([2], tokens, 0)])
    torch.testing.assert_close(logits[0], adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], base, atol=1e-4, rtol=1e-4)


def test_an_adapter_for_projections_the_model_lacks_is_refused_naming_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A Llama-style adapter (q_proj, ...) on Phi-3, whose checkpoint has qkv_proj: refused, not half applied."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    phi3 = tiny("phi3")
    with pytest.raises(ConfigError, match=r"q_proj.*this model's projections are .*qkv_proj"):
        read_adapter(AdapterSpec("x", str(tmp_path)), projection_features(phi3), SHAPE["num_hidden_layers"])


def test_alpha_patterns_name_the_block_each_projection_is_in(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PEFT matches alpha_pattern keys against the real module name: Phi-3's gate_up_proj is mlp.gate_up_proj."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS["phi3"],
        alpha_pattern={r"mlp\.gate_up_proj": 32},
        init_lora_weights=False,
    )
    torch.manual_seed(5)
    peft_model = get_peft_model(tiny("phi3"), config)
    peft_model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (9,)).tolist()
    with torch.inference_mode():
        adapted = peft_model(torch.tensor([tokens])).logits[0, -1]
    runner_model = tiny("phi3")
    features = projection_features(runner_model)
    adapter = read_adapter(AdapterSpec("a", str(tmp_path)), features, SHAPE["num_hidden_layers"])
    banks = LoraBanks([adapter], features, 2, torch.float32, torch.device("cpu"))
    logits = runner_for(runner_model, "torch", banks).step([RowWork([1], tokens, 0, adapter=0)])
    torch.testing.assert_close(logits[0], adapted, atol=1e-4, rtol=1e-4)


# ---- the allow-list ------------------------------------------------------------------------------------------------

# A value each shared setting refuses, and one it serves (beyond the defaults every case above already serves)
REFUSED = {
    "rope_type": {
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 128,
        }
    },
    "partial_rotary_factor": {"partial_rotary_factor": 0.5},
    "layer_types": {"layer_types": ["full_attention", "chunked_attention"]},
    "is_encoder_decoder": {"is_encoder_decoder": True},
    "is_causal": {"is_causal": False},
    "sliding_window": {"sliding_window": -1},
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_setting_of_every_family_refuses_what_the_runner_lacks_by_name(model_type: str) -> None:
    from transformers import AutoConfig

    family = FAMILIES[model_type]
    family_for(AutoConfig.for_model(model_type, **SHAPE))  # the family's defaults are served
    for setting in family.all_settings():
        if setting.key == family.activation_key:
            changes = {setting.key: "relu"}
        elif setting.key in REFUSED:
            changes = REFUSED[setting.key]
        elif setting.accepts is not None:  # a number the family serves only some of: a negative one, of its type
            default = getattr(AutoConfig.for_model(model_type, **SHAPE), setting.key, None)
            changes = {setting.key: -1 if type(default) is int else -1.0}
        else:  # a family's own setting: any value outside what it serves
            changes = {setting.key: next(v for v in (True, 1, "x") if v not in setting.allowed)}
        config = AutoConfig.for_model(model_type, **SHAPE)
        for key, value in changes.items():
            setattr(config, key, value)
        with pytest.raises(
            ConfigError,
            match=rf"this {model_type} model uses what loraserve does not implement: .*"
            rf"{setting.key}=",
        ):
            family_for(config)


@pytest.mark.parametrize("rope_type", sorted(STATIC_ROPE_TYPES))
def test_each_served_rope_type_passes(rope_type: str) -> None:
    from transformers import LlamaConfig

    parameters = {"rope_type": rope_type, "rope_theta": 10000.0, **({"factor": 2.0} if rope_type != "default" else {})}
    if rope_type == "llama3":
        parameters = LLAMA3_ROPE
    assert family_for(LlamaConfig(**SHAPE, rope_parameters=parameters)).model_type == "llama"


def test_an_architecture_without_a_family_is_refused_before_torch_is_imported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(ConfigError, match=r"a 'gpt2' model \(GPT2LMHeadModel\); loraserve serves gemma2, llama, "):
        family_for(GPT2Config(architectures=["GPT2LMHeadModel"]))
    classifier = LlamaConfig(architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ConfigError, match=r"a LlamaForSequenceClassification checkpoint; .*\(LlamaForCausalLM"):
        family_for(classifier)
    assert family_for(LlamaConfig(architectures=["LLaMAForCausalLM"])).model_type == "llama"  # an old conversion
    (tmp_path / "config.json").write_text('{"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}')
    with pytest.raises(ConfigError, match=r"a 't5' model \(T5ForConditionalGeneration\); loraserve serves"):
        preflight.local_model_path(str(tmp_path))


def test_block_ids_outside_the_cache_are_refused_once_per_step_before_any_kernel_reads_them() -> None:
    runner = runner_for(tiny("llama"), "native")
    calls = []
    check = runner.kernels.check_blocks
    runner.kernels.check_blocks = lambda *args: (calls.append(args), check(*args))[1]  # type: ignore[method-assign]
    runner.step([RowWork([1], tuple(range(5)), 0, wants_logits=False)])
    runner.step([RowWork([1], (5,), 5), RowWork([2], (6,), 0)])
    assert len(calls) == 2  # one per step, whatever the layers
    with pytest.raises(ValueError, match=r"block ids from 1 to 12, outside \[0, 12\)"):
        runner.step([RowWork([1, 12], (7,), 16)])
