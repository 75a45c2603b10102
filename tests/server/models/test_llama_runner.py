"""The runner's forward pass against transformers' own, logit for logit, for each registered architecture: prompts
fed in chunks, sequences at different stages in one step, and single-token decode steps, over scattered KV blocks;
on PyTorch ops and on the native kernels (decode attention reading the blocks in place, RMSNorm, RoPE, SwiGLU); and the
registry's refusal of other architectures."""

from __future__ import annotations

import pytest
import torch

from loraserve.errors import ConfigError
from loraserve.server.models import native
from loraserve.server.models.adapters import AdapterSpec
from loraserve.server.models.kv_blocks import PagedKVCache
from loraserve.server.models.llama import GATE_UP_PROJ, QKV_PROJ, LlamaRunner, prepare_linears
from loraserve.server.models.lora import LoraBanks, read_adapter
from loraserve.server.models.registry import RUNNERS, runner_class
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


def tiny(model_type: str):  # type: ignore[no-untyped-def]
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v projections with biases
    }
    config_cls, model_cls, extra = classes[model_type]
    torch.manual_seed(0)
    return model_cls(config_cls(**SHAPE, **extra)).eval()


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers_for_chunks_and_decode(model_type: str, kernels: str) -> None:
    model = tiny(model_type)
    torch.manual_seed(1)
    a, b = torch.randint(0, 300, (40,)).tolist(), torch.randint(0, 300, (25,)).tolist()
    with torch.inference_mode():
        expected_a = model(torch.tensor([a])).logits[0]  # [40, V]: next-token logits at every position
        expected_b = model(torch.tensor([b])).logits[0]
    runner_model = tiny(model_type)  # a fresh copy: prepare_linears drops the plain weights on a CPU
    shape = LlamaRunner.cache_shape(runner_model, torch.float32)
    native_kernels = native.select(kernels, shape, torch.device("cpu"))
    assert (native_kernels is None) == (kernels == "torch")
    kv = PagedKVCache(shape, 12, 16, torch.device("cpu"))
    runner = runner_class(runner_model)(runner_model, prepare_linears(runner_model), kv, None, native_kernels)
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


@pytest.mark.parametrize("kernels", ["torch", "native"])
def test_an_adapter_on_every_projection_matches_peft_beside_a_base_row(tmp_path, kernels: str) -> None:  # type: ignore[no-untyped-def]
    """q, k and v run as one fused projection on a CPU, and gate and up as another; each one's LoRA update must still
    land on its own slice."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(2)
    peft_model = get_peft_model(
        tiny("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (12,)).tolist()
    with torch.inference_mode():
        adapted = peft_model(torch.tensor([tokens])).logits[0, -1]
        base = tiny("qwen2")(torch.tensor([tokens])).logits[0, -1]
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the output

    runner_model = tiny("qwen2")
    linears = prepare_linears(runner_model)
    assert (0, QKV_PROJ) in linears and (0, "k_proj") not in linears
    assert (0, GATE_UP_PROJ) in linears and (0, "up_proj") not in linears
    adapter = read_adapter(
        AdapterSpec("all", str(tmp_path)), LlamaRunner.projection_features(runner_model), SHAPE["num_hidden_layers"]
    )
    banks = LoraBanks([adapter], LlamaRunner.projection_features(runner_model), 2, torch.float32, torch.device("cpu"))
    shape = LlamaRunner.cache_shape(runner_model, torch.float32)
    kv = PagedKVCache(shape, 8, 16, torch.device("cpu"))
    runner = LlamaRunner(runner_model, linears, kv, banks, native.select(kernels, shape, torch.device("cpu")))
    logits = runner.step([RowWork([1], tokens, 0, adapter=0), RowWork([2], tokens, 0)])
    torch.testing.assert_close(logits[0], adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], base, atol=1e-4, rtol=1e-4)


def test_the_registry_refuses_other_architectures_naming_the_supported_ones() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    assert sorted(RUNNERS) == ["llama", "mistral", "qwen2"]
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ConfigError, match=r"a 'gpt2' model \(GPT2LMHeadModel\); .* llama, mistral, qwen2"):
        runner_class(model)


def test_sliding_window_attention_is_refused() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=8, use_sliding_window=True))
    with pytest.raises(ConfigError, match="sliding-window"):
        runner_class(model)
