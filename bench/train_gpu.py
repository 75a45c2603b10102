"""Training on a GPU: QLoRA against plain LoRA on a Llama-2-7B-shaped model with random weights (speed and memory do
not depend on the values). r=64, max length 512, batch 4, gradient checkpointing; reports tokens/s and the peak GPU
memory of the training steps for each, with the card. A few minutes on an H100/H200.

    .venv/bin/python bench/train_gpu.py            # on a CUDA machine (needs bitsandbytes for the QLoRA run)
    .venv/bin/python bench/train_gpu.py --tiny     # a tiny model on the CPU, plain LoRA only: checks the script
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraserve.trainer.config import TrainConfig
from loraserve.trainer.model import attach_lora

from common import machine
from gpu import LLAMA2_7B, TINY, build_model

ROOT = Path(__file__).resolve().parent.parent


def quantize_4bit(model: torch.nn.Module) -> None:
    """Swap every projection for a bitsandbytes NF4 (double-quantized) layer, as a QLoRA load would give."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                quantized.weight = bnb.nn.Params4bit(
                    linear.weight.data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to("cuda")
                setattr(parent, name, quantized)
    torch.cuda.empty_cache()


def batches(vocab: int, count: int, batch: int, length: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def measure(model, config: TrainConfig, device: torch.device, steps: int, length: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Tokens/s and peak memory of `steps` optimizer steps (the first one, a warm-up, is not timed)."""
    peft_model = attach_lora(model, config)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate)
    data = batches(model.config.vocab_size, steps, config.batch_size, length, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = 0.0
    for i, batch in enumerate(data):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = (steps - 1) * config.batch_size * length
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": round(tokens / seconds, 1), "peak_gib": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (plain LoRA only)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape, vocab = (TINY, 1000) if args.tiny else (LLAMA2_7B, 32000)
    config = replace(TrainConfig(), lora_r=64, batch_size=4, max_length=args.length, gradient_checkpointing=True)
    figures: dict[str, object] = machine() | {"device": str(device), "rank": 64, "batch": 4, "length": args.length}
    for name in ("lora", "qlora"):
        if name == "qlora" and device.type != "cuda":
            figures["qlora"] = "skipped: QLoRA needs CUDA and bitsandbytes"
            continue
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(shape, vocab, device, dtype)
        if name == "qlora":
            from peft import prepare_model_for_kbit_training

            quantize_4bit(model)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        print(f"{name}: measuring {args.steps} steps ...", flush=True)
        figures[name] = measure(model, config, device, args.steps, args.length)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(figures, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "tiny-cpu" if args.tiny else torch.cuda.get_device_name(device).replace(" ", "-")
    (args.out / f"train-gpu-{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
