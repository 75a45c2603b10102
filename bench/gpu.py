"""The GPU measurement: a Llama-2-7B-shaped model with random fp16 weights (speed does not depend on the values) and
r=64 q/v LoRA adapters, run through loraserve's engine in-process; Hugging Face generate on the same model for
reference. One short script that prints everything (with the card) and writes JSON; a few minutes on an H100/H200.

    .venv/bin/python bench/gpu.py                 # on a CUDA machine
    .venv/bin/python bench/gpu.py --tiny          # a tiny model on the CPU: checks the script itself

Figures: batch-1 decode tokens/s against the memory roofline (weight bytes / memory bandwidth), 64 concurrent streams
aggregate tokens/s, and what LoRA costs at batch 1 and in a batch mixing 4 adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.config import EngineConfig, ModelConfig
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.params import GenerationRequest, StoppingParams
from loraserve.server.models.adapters.files import read_adapter
from loraserve.server.models.adapters.spec import AdapterSpec
from loraserve.server.models.decoder import prepare_linears, projection_features
from loraserve.server.models.loading import LoadedModel, resolve_model_folder
from loraserve.server.models.types import ModelDescription

from common import machine, prompts

ROOT = Path(__file__).resolve().parent.parent
# Peak memory bandwidth in bytes/s by card name (vendor datasheets); other cards are measured with a large copy.
BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.04e12,
}
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def tokenizer():  # type: ignore[no-untyped-def]
    """SmolLM2's tokenizer (offline); the model below uses its vocabulary size, so every id it produces decodes."""
    from transformers import AutoTokenizer

    # From the server's cached conversion of the GGUF file: reading the tokenizer out of the GGUF takes seconds.
    folder, _ = resolve_model_folder("default", Path(os.environ.get("LORASERVE_MODEL_CACHE", ModelConfig.model_cache)))
    return AutoTokenizer.from_pretrained(folder)


def build_model(shape: dict, vocab: int, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        vocab_size=vocab,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:  # random initialisation on the device itself: seconds instead of minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def write_adapter(model, folder: Path, rank: int, seed: int) -> Path:  # type: ignore[no-untyped-def]
    """A random LoRA adapter on q_proj and v_proj, in PEFT's file format."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, layer in enumerate(model.model.layers):
        for name in ("q_proj", "v_proj"):
            module = getattr(layer.self_attn, name)
            prefix = f"base_model.model.model.layers.{index}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def loaded_model(model, tok, adapters: list[Path]) -> LoadedModel:  # type: ignore[no-untyped-def]
    from loraserve.prompting import HumanAssistantFormat

    features = projection_features(model)
    lora = [
        read_adapter(AdapterSpec(f"a{i}", str(p)), features, model.config.num_hidden_layers)
        for i, p in enumerate(adapters)
    ]
    description = ModelDescription(
        "llama-2-7b-shaped (random)",
        "bench",
        "LlamaForCausalLM",
        str(model.dtype).removeprefix("torch."),
        str(model.device),
        "none",
        model.config.max_position_embeddings,
        model.config.vocab_size,
    )
    return LoadedModel(
        model=model,
        linears=prepare_linears(model),
        tokenizer=tok,
        prompt_format=HumanAssistantFormat(),
        lora_adapters=tuple(lora),
        description=description,
        eos_token_ids=frozenset(),
        pad_token_id=2,
    )


def bandwidth(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return float("nan"), "none (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in BANDWIDTH.items():
        if key in name:
            return value, f"datasheet ({key})"
    block = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    copy = torch.empty_like(block)
    copy.copy_(block)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        copy.copy_(block)
    torch.cuda.synchronize()
    return 2 * 10 * block.numel() / (time.perf_counter() - start), "measured (device copy)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def hf_figures(model, tok, device: torch.device, new_tokens: int, static_batch: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    ids = tok("Once upon a time", return_tensors="pt").input_ids.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    one = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.generate(**one, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)
    sync(device)
    start = time.perf_counter()
    model.generate(**one, **kwargs)
    sync(device)
    batch_one = new_tokens / (time.perf_counter() - start)
    batch = ids.repeat(static_batch, 1)
    start = time.perf_counter()
    model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **kwargs)
    sync(device)
    static = static_batch * new_tokens / (time.perf_counter() - start)
    return {"hf_batch1_tok_s": round(batch_one, 1), f"hf_static_batch{static_batch}_tok_s": round(static, 1)}


def decode_rate(engine: Engine, prompt: str, new_tokens: int, adapter: str = "") -> float:
    """Tokens/s of one request's decode phase (first token to last)."""
    stream = engine.submit(
        GenerationRequest(
            prompt=prompt,
            adapter_id=adapter,
            stopping=StoppingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
        )
    )
    times = [time.perf_counter() for _ in stream]
    return (len(times) - 1) / (times[-1] - times[0])


def aggregate_rate(engine: Engine, texts: list[str], new_tokens: int, adapters: list[str]) -> float:
    """Generated tokens/s of len(texts) requests submitted at once, from the first submit to the last token."""
    stopping = StoppingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    start = time.perf_counter()
    streams = [
        engine.submit(GenerationRequest(prompt=t, adapter_id=adapters[i % len(adapters)], stopping=stopping))
        for i, t in enumerate(texts)
    ]
    tokens = sum(s.result().generated_token_count for s in streams)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, to check the script")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    tok = tokenizer()
    started = time.perf_counter()
    model = build_model(TINY if args.tiny else LLAMA2_7B, len(tok), device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"model: {weight_bytes / 1e9:.2f} GB of {dtype} weights on {device} (built in "
        f"{time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    figures: dict[str, object] = machine() | {
        "device": str(device),
        "dtype": str(dtype),
        "weight_gb": weight_bytes / 1e9,
    }
    figures |= hf_figures(model, tok, device, args.new_tokens // 2, 32)
    print("HF:", figures, flush=True)
    scratch = args.out / "adapters-tmp"
    adapters = [write_adapter(model, scratch / f"a{i}", args.rank, seed=i) for i in range(4)]
    engine = Engine(
        loaded_model(model, tok, adapters),
        replace(
            EngineConfig(),
            max_batch_size=args.streams,
            max_queued_requests=args.streams,
            max_new_tokens=4096,
            kv_cache_memory="64MB" if args.tiny else "auto",  # the tiny model needs little; "auto" would take 2 GiB
        ),
    )
    engine.start()
    try:
        texts = prompts(tok, args.streams, args.prompt_tokens)
        decode_rate(engine, texts[0], 8)  # warm-up, and the batch-1 graph
        base1 = decode_rate(engine, texts[0], args.new_tokens * 2)
        lora1 = decode_rate(engine, texts[0], args.new_tokens * 2, "a0")
        aggregate_rate(engine, texts, 8, [""])  # warm-up of the larger buckets
        base_n = aggregate_rate(engine, texts, args.new_tokens, [""])
        mixed_n = aggregate_rate(engine, texts, args.new_tokens, ["a0", "a1", "a2", "a3"])
    finally:
        engine.stop()
    peak, source = bandwidth(device)
    roofline = peak / weight_bytes
    figures |= {
        "bandwidth_bytes_s": peak,
        "bandwidth_source": source,
        "roofline_batch1_tok_s": round(roofline, 1),
        "batch1_tok_s": round(base1, 1),
        "batch1_vs_roofline": round(base1 / roofline, 3),
        "batch1_lora_tok_s": round(lora1, 1),
        "lora_cost_batch1": round(1 - lora1 / base1, 3),
        f"streams{args.streams}_tok_s": round(base_n, 1),
        f"streams{args.streams}_4_adapters_tok_s": round(mixed_n, 1),
        "lora_cost_mixed": round(1 - mixed_n / base_n, 3),
        "batch1_vs_hf": round(base1 / float(figures["hf_batch1_tok_s"]), 2),  # type: ignore[arg-type]
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "tiny-cpu" if args.tiny else torch.cuda.get_device_name(device).replace(" ", "-")
    (args.out / f"gpu-{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    for folder in adapters:
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()
    scratch.rmdir()


if __name__ == "__main__":
    main()
