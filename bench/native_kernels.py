"""The runner's steps on the native kernels (--kernels native) against PyTorch ops (--kernels torch): two runners
over one model's weights, each with its own KV cache holding the same prompts in the same scattered blocks, stepping
in turn so that both see the same machine state. Decode steps at each batch size and context, then prefill steps of
--prefill-tokens prompt tokens. Prints the machine, the median step time of each, their ratio, and the largest logit
difference between them.

    .venv/bin/python bench/native_kernels.py --rows 1 8 32 --context 192 1024
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from loraserve.config import ModelConfig
from loraserve.server.models import native
from loraserve.server.models.decoder import DecoderRunner, cache_shape
from loraserve.server.models.kv_blocks import PagedKVCache
from loraserve.server.models.loading import load_model
from loraserve.server.models.types import RowWork

from common import machine

BLOCK = 16
PATHS = ("torch", "native")


def measure(runners: dict[str, DecoderRunner], vocab: int, rows: int, context: int, steps: int) -> dict[str, object]:
    """Prefill `rows` prompts of `context` tokens into both caches (the same scattered blocks), then time decode steps
    of all rows, alternating runners."""
    per_row = -(-(context + steps + 1) // BLOCK)
    blocks = random.Random(rows * 7919 + context).sample(range(1, rows * per_row + 1), rows * per_row)
    tables = [blocks[i * per_row : (i + 1) * per_row] for i in range(rows)]
    prompts = [[(i * 31 + p * 7) % vocab for p in range(context)] for i in range(rows)]
    for runner in runners.values():
        for i in range(rows):  # one prompt per step: a long context would not fit one step's attention mask
            runner.step([RowWork(tables[i], tuple(prompts[i]), 0, wants_logits=False)])
    times: dict[str, list[float]] = {name: [] for name in runners}
    logits: dict[str, torch.Tensor] = {}
    for step in range(steps):
        work = [RowWork(tables[i], ((i + step) % vocab,), context + step) for i in range(rows)]
        for name, runner in runners.items():
            start = time.perf_counter()
            logits[name] = runner.step(work)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) * 1000 for name, values in times.items()}  # the first warms up
    return {
        "rows": rows,
        "context": context,
        **compare(medians, logits),
    }


def compare(medians: dict[str, float], logits: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        "torch_ms": round(medians["torch"], 2),
        "native_ms": round(medians["native"], 2),
        "speedup": round(medians["torch"] / medians["native"], 3),
        "max_logit_difference": float((logits["torch"] - logits["native"]).abs().max()),
    }


def measure_prefill(runners: dict[str, DecoderRunner], vocab: int, tokens: int, steps: int) -> dict[str, object]:
    """Prefill steps of `tokens` prompt tokens (4 prompts), alternating runners; each step writes the same blocks."""
    per_prompt = tokens // 4
    times: dict[str, list[float]] = {name: [] for name in runners}
    logits: dict[str, torch.Tensor] = {}
    for step in range(steps):
        work = [
            RowWork(
                list(range(1 + i * -(-per_prompt // BLOCK), 1 + (i + 1) * -(-per_prompt // BLOCK))),
                tuple((step * 13 + i * 101 + p) % vocab for p in range(per_prompt)),
                0,
            )
            for i in range(4)
        ]
        for name, runner in runners.items():
            start = time.perf_counter()
            logits[name] = runner.step(work)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) * 1000 for name, values in times.items()}
    return {"prefill_tokens": 4 * per_prompt, **compare(medians, logits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="default, or a local Hugging Face folder")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--context", type=int, nargs="+", default=[192, 1024], help="cached positions per row")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per runner and level")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens per prefill step (4 prompts)")
    parser.add_argument("--prefill-steps", type=int, default=6, help="prefill steps timed per runner")
    parser.add_argument("--output", default="bench/results/native-kernels-cpu.json")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}")
    print(f"cpu flags: {info['cpu_flags']}")
    loaded = load_model(ModelConfig(model=args.model, device="cpu", dtype="float32"))
    model = loaded.model
    shape = cache_shape(model, torch.float32)
    needed = max(args.rows) * -(-(max(args.context) + args.steps + 1) // BLOCK) + 1
    cpu = torch.device("cpu")
    needed = max(needed, 4 * -(-args.prefill_tokens // 4 // BLOCK) + 1)
    runners = {
        name: DecoderRunner(
            model, loaded.linears, PagedKVCache(shape, needed, BLOCK, cpu), None, native.select(name, shape, cpu)
        )
        for name in PATHS
    }
    results = []
    print(f"{'step':>22} {'torch ms':>9} {'native ms':>10} {'speedup':>8} {'max |dlogit|':>13}")
    for context in args.context:
        for rows in args.rows:
            result = measure(runners, model.config.vocab_size, rows, context, args.steps)
            results.append(result)
            show(f"decode {rows} x {context}", result)
    prefill = measure_prefill(runners, model.config.vocab_size, args.prefill_tokens, args.prefill_steps)
    show(f"prefill {prefill['prefill_tokens']} tokens", prefill)
    report = {"machine": info, "steps": args.steps, "decode": results, "prefill": prefill}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))


def show(label: str, result: dict[str, object]) -> None:
    print(
        f"{label:>22} {result['torch_ms']:>9.1f} {result['native_ms']:>10.1f} "
        f"{result['speedup']:>7.2f}x {result['max_logit_difference']:>13.2e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
