"""Each family end to end: a tiny random model of it saved as safetensors beside the real tokenizer, loaded by
load_model and served by an engine (native kernels, several requests batched, one with a LoRA adapter), each
request's greedy tokens equal to transformers' generate. What a family cannot serve fails at load, by name."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from loraserve.config import EngineConfig, ModelConfig
from loraserve.errors import ConfigError
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.params import GenerationRequest, OutputOptions, StoppingParams
from loraserve.server.models.loading import load_model
from tests.server.models.test_families import CASES, SHAPE

PROMPTS = ["The quick brown fox jumps over the lazy dog, and then", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", "Hi"]
NEW_TOKENS = 20


def save_tiny(case: str, out: Path, tokenizer_dir: Path, vocab_size: int, **changes: object) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = CASES[case]
    shape = {**SHAPE, "vocab_size": vocab_size, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2}
    config = AutoConfig.for_model(model_type, **{**shape, **settings, **changes})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)


@pytest.mark.parametrize("case", ["gemma2", "llama3.1", "mistral", "phi3", "qwen2-windows", "qwen3"])
def test_each_family_is_served_with_generates_greedy_tokens(case: str, tmp_path, tokenizer_dir, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    save_tiny(case, tmp_path / "model", tokenizer_dir, len(tokenizer))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager").eval()
    targets = ["qkv_proj", "down_proj"] if CASES[case][0] == "phi3" else ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(1)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager"),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    ).eval()
    adapted.save_pretrained(tmp_path / "adapter")

    loaded = load_model(ModelConfig(model=str(tmp_path / "model"), adapter=(f"a={tmp_path / 'adapter'}",)))
    engine = Engine(loaded, dataclasses.replace(EngineConfig(), kv_cache_memory="16MB", kernels="auto"))
    engine.start()
    try:
        requests = [(prompt, "") for prompt in PROMPTS] + [(PROMPTS[0], "a")]
        streams = [
            engine.submit(
                GenerationRequest(
                    prompt=prompt,
                    adapter_id=adapter,
                    output=OutputOptions(token_ids=True),
                    stopping=StoppingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
                )
            )
            for prompt, adapter in requests
        ]
        for (prompt, adapter), stream in zip(requests, streams, strict=True):
            ids = engine.tokenization.encode(prompt)
            model = adapted if adapter else reference
            with torch.inference_mode():
                expected = model.generate(
                    input_ids=torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )[0, len(ids) :].tolist()
            assert [t.id for t in stream.result().tokens] == expected, (case, prompt, adapter)
    finally:
        engine.stop()


def test_a_setting_the_runner_lacks_fails_at_load_by_name(tmp_path, tokenizer_dir, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Before this check, a longrope Llama was served with the wrong rotation past its original context."""
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 128,
    }
    save_tiny("llama", tmp_path, tokenizer_dir, len(tokenizer), rope_parameters=longrope)
    with pytest.raises(ConfigError, match=r"--model .*: this llama model uses .*rope_type='longrope'"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_a_config_transformers_refuses_is_a_config_error_naming_the_model(tmp_path, tokenizer_dir, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """transformers' own validation (here: layer_types for 3 layers on a 2-layer model) fails start-up as a
    ConfigError with its reason, not a traceback."""
    import json

    save_tiny("qwen2", tmp_path, tokenizer_dir, len(tokenizer))
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"--model .*: config.json: .*layer_types"):
        load_model(ModelConfig(model=str(tmp_path)))
