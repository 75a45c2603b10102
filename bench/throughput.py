"""Throughput and latency of loraserve against Hugging Face generate and llama.cpp, side by side on one machine in one
run, with the machine's own matmul peak as the roof.

In order: the machine's fp32 matmul peak (a large torch.mm); `loraserve serve` on the model, driven by N concurrent
gRPC streams per concurrency level (fixed prompts, min_new_tokens = max_new_tokens so EOS cannot cut a run short),
at the top level in turn with a batch mixing several LoRA adapters; then Poisson arrivals (an open loop at 80% of the
16-stream capacity), then 16 streams whose prompts share a long system prompt, on that server (prefix caching on)
and on one started with --no-prefix-caching; llama.cpp's llama-server on the same weights and prompt tokens (see
bench/peer.py); and the baselines on the same model: sequential `model.generate` at batch 1 and static-batch
`model.generate` at each level.
Prints the machine (CPU model and SIMD flags) with the table, writes JSON and a PNG plot.

    .venv/bin/python bench/throughput.py                       # the default model, levels 1 4 16 32
    .venv/bin/python bench/throughput.py --levels 1 32 --no-peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import load
import peer
from common import FreshPrompts, machine, make_adapters, matmul_peak_gflops, prompts

ROOT = Path(__file__).resolve().parent.parent
POISSON_STREAMS = 16  # the Poisson run offers 80% of what the server sustained with this many closed-loop streams
POISSON_LOAD = 0.8


def measure_levels(
    args: argparse.Namespace, target: str, fresh: FreshPrompts, level: int, kinds: dict[str, list[str]]
) -> list[load.LevelResult]:
    """For each kind of run (name -> the adapters its requests cycle through), the median run by throughput of
    --repeats runs at `level` streams (this machine's timing noise is about 10%). The kinds take turns, so that a
    ratio between them is measured side by side, not minutes apart."""
    runs: dict[str, list[load.LevelResult]] = {name: [] for name in kinds}
    for repeat in range(args.repeats):
        for name, adapters in kinds.items():
            print(f"{name}: {level} concurrent streams (run {repeat + 1}/{args.repeats}) ...", flush=True)
            texts = fresh.take(level * args.requests_per_stream)
            outcomes, seconds = asyncio.run(
                load.drive(target, texts, level, args.requests_per_stream, args.new_tokens, adapters)
            )
            runs[name].append(load.summarize(name, level, outcomes, seconds))
    return [sorted(kind, key=lambda run: run.tokens_per_second)[len(kind) // 2] for kind in runs.values()]


def measure_server(
    args: argparse.Namespace, fresh: FreshPrompts, system: str, adapters: list[Path]
) -> list[load.LevelResult]:
    port = load.free_port()
    server = load.start_server(args, adapters, port)
    target = f"127.0.0.1:{port}"
    results = []
    try:
        asyncio.run(load.drive(target, fresh.take(1), 1, 1, 4, [""]))  # warm the server up
        for level in args.levels:
            kinds = {"server": [""]}
            if adapters and level == max(args.levels):  # the mixed-adapter batch, in turn with the base model's
                kinds[f"server, {len(adapters)} adapters mixed"] = [f"a{i}" for i in range(len(adapters))]
            results.extend(measure_levels(args, target, fresh, level, kinds))
        results.append(measure_poisson(args, target, fresh, results))
        results.append(measure_shared_prefix(args, target, system, "server, shared prefix, cached"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    server = load.start_server(args, [], port, "--no-prefix-caching")
    try:
        results.append(measure_shared_prefix(args, target, system, "server, shared prefix, no cache"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results


def measure_poisson(
    args: argparse.Namespace, target: str, fresh: FreshPrompts, closed: list[load.LevelResult]
) -> load.LevelResult:
    capacity = next(
        (r.tokens_per_second for r in closed if r.name == "server" and r.concurrency == POISSON_STREAMS),
        max(r.tokens_per_second for r in closed if r.name == "server"),
    )
    rate = POISSON_LOAD * capacity / args.new_tokens  # requests per second
    count = POISSON_STREAMS * 3
    print(f"server: {count} Poisson arrivals at {rate:.2f} requests/s ...", flush=True)
    outcomes, seconds = asyncio.run(load.drive_poisson(target, fresh.take(count), rate, args.new_tokens))
    return load.summarize(f"server, Poisson {rate:.2f} req/s", POISSON_STREAMS, outcomes, seconds)


SHARED_OUTPUTS: dict[str, list[str]] = {}


def measure_shared_prefix(args: argparse.Namespace, target: str, system: str, name: str) -> load.LevelResult:
    """16 streams whose prompts are one long system prompt plus their own question, after one request with the same
    system prompt (as on a service that has been running): TTFT is what prefix caching changes."""
    questions = [f"\n\nQuestion {i}: summarize paragraph {i % 5 + 1} in one sentence." for i in range(16)]
    print(f"{name}: 16 streams sharing a {args.shared_prefix_tokens}-token prompt head ...", flush=True)
    asyncio.run(load.drive(target, [system + " Warm-up."], 1, 1, 4, [""]))
    outcomes, seconds = asyncio.run(load.drive(target, [system + q for q in questions], 16, 1, args.new_tokens, [""]))
    SHARED_OUTPUTS[name] = [o.text for o in outcomes]
    result = load.summarize(name, 16, outcomes, seconds)
    cached = sum(o.cached for o in outcomes) / len(outcomes)
    print(f"  mean cached prompt tokens per request: {cached:.0f} of {result.mean_input_tokens:.0f}")
    return result


def measure_peer(args: argparse.Namespace, fresh: FreshPrompts) -> list[load.LevelResult]:
    from loraserve.server.models.loading import default_gguf_path

    port = load.free_port()
    server = peer.start(
        default_gguf_path(), port, max(args.levels), args.prompt_tokens + args.new_tokens + 16, torch.get_num_threads()
    )

    def ids(count: int) -> list[list[int]]:  # the same tokens loraserve gets for the same texts
        return [fresh.tokenizer.encode(t, add_special_tokens=False) for t in fresh.take(count)]

    results = []
    try:
        peer.drive(port, ids(1), 1, 1, 4)  # warm up
        for level in args.levels:
            print(f"llama.cpp: {level} concurrent streams ...", flush=True)
            prompt_ids = ids(level * args.requests_per_stream)
            outcomes, seconds = peer.drive(port, prompt_ids, level, args.requests_per_stream, args.new_tokens)
            results.append(load.summarize("llama.cpp llama-server", level, outcomes, seconds))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results


def hf_model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraserve.server.models.loading import resolve_model_folder

    folder, _ = resolve_model_folder(args.model, Path(args.model_cache).expanduser())
    dtype = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer, folder


@torch.inference_mode()
def measure_hf(model, tokenizer, texts: list[str], args: argparse.Namespace) -> list[load.LevelResult]:  # type: ignore[no-untyped-def]
    """Sequential generate at batch 1, and static-batch generate at every level above 1: each the median of --repeats
    runs, as the server's figures are (one run of a static batch lasts seconds, and this machine's timing drifts)."""
    new_tokens = args.new_tokens
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    model.generate(**tokenizer(texts[:1], return_tensors="pt"), max_new_tokens=4, min_new_tokens=4, do_sample=False)

    def median_seconds(label: str, batches: list[dict[str, torch.Tensor]]) -> float:
        runs = []
        for repeat in range(args.repeats):
            print(f"HF generate: {label} (run {repeat + 1}/{args.repeats}) ...", flush=True)
            start = time.perf_counter()
            for batch in batches:
                model.generate(**batch, **kwargs)
            runs.append(time.perf_counter() - start)
        return sorted(runs)[len(runs) // 2]

    sequential = args.sequential_requests
    singles = [tokenizer([text], return_tensors="pt") for text in texts[:sequential]]
    seconds = median_seconds(f"{sequential} requests one after another", singles)
    results = [hf_result("hf sequential", 1, sequential, new_tokens, seconds, args)]
    for level in args.levels:
        if level == 1:
            continue
        batch = tokenizer(texts[:level], return_tensors="pt", padding=True)
        seconds = median_seconds(f"static batch of {level}", [batch])
        results.append(hf_result("hf static batch", level, level, new_tokens, seconds, args))
    return results


def hf_result(
    name: str, concurrency: int, requests: int, new_tokens: int, seconds: float, args: argparse.Namespace
) -> load.LevelResult:
    nan = float("nan")
    tokens = requests * new_tokens
    return load.LevelResult(
        name,
        concurrency,
        requests,
        tokens,
        round(seconds, 3),
        round(tokens / seconds, 1),
        nan,
        nan,
        nan,
        nan,
        args.prompt_tokens,
    )


def model_gflop(model, result: load.LevelResult) -> float:  # type: ignore[no-untyped-def]
    """The matmul work of a run: every projection for every prompt and generated token, the LM head for every
    generated token (attention's own matmuls, under 10% here, are left out: the figure is a floor)."""
    projections = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    head = model.lm_head.weight.numel()
    prompt_tokens = result.mean_input_tokens * result.requests
    return 2 * (projections * (prompt_tokens + result.generated_tokens) + head * result.generated_tokens) / 1e9


TARGETS = {  # ratio name -> (bound, "min" or "max"), from the engine v2 issue
    "server_32_vs_hf_static_32": (1.25, "min"),
    "server_32_vs_hf_sequential": (10.0, "min"),
    "server_32_peak_fraction": (0.5, "min"),
    "server_32_vs_peer_32": (1.0, "min"),
    "server_1_vs_hf_generate": (1.2, "min"),
    "poisson_ttft_p50_s": (1.0, "max"),
    "poisson_itl_p95_over_p50": (2.5, "max"),
    "shared_prefix_ttft_speedup": (3.0, "min"),
    "mixed_adapters_vs_base": (0.9, "min"),
}


def ratios_of(results: list[load.LevelResult], peak: float, model) -> dict[str, float]:  # type: ignore[no-untyped-def]
    by = {(r.name, r.concurrency): r for r in results}
    sequential = by[("hf sequential", 1)].tokens_per_second
    ratios: dict[str, float] = {"matmul_peak_gflops": round(peak, 1)}
    for r in results:
        if r.name == "server":
            level = r.concurrency
            ratios[f"server_{level}_vs_hf_sequential"] = round(r.tokens_per_second / sequential, 2)
            ratios[f"server_{level}_peak_fraction"] = round(model_gflop(model, r) / r.seconds / peak, 3)
            if ("hf static batch", level) in by:
                ratios[f"server_{level}_vs_hf_static_{level}"] = round(
                    r.tokens_per_second / by[("hf static batch", level)].tokens_per_second, 2
                )
            if ("llama.cpp llama-server", level) in by:
                ratios[f"server_{level}_vs_peer_{level}"] = round(
                    r.tokens_per_second / by[("llama.cpp llama-server", level)].tokens_per_second, 2
                )
        elif r.name.startswith("server,") and "adapters" in r.name:
            ratios["mixed_adapters_vs_base"] = round(
                r.tokens_per_second / by[("server", r.concurrency)].tokens_per_second, 2
            )
        elif r.name.startswith("server, Poisson"):
            ratios["poisson_ttft_p50_s"] = r.ttft_p50_s
            ratios["poisson_itl_p95_over_p50"] = round(r.itl_p95_ms / r.itl_p50_ms, 2)
    if 1 in {r.concurrency for r in results if r.name == "server"}:
        ratios["server_1_vs_hf_generate"] = ratios["server_1_vs_hf_sequential"]
    cached, uncached = by.get(("server, shared prefix, cached", 16)), by.get(("server, shared prefix, no cache", 16))
    if cached and uncached:
        ratios["shared_prefix_ttft_speedup"] = round(uncached.ttft_p50_s / cached.ttft_p50_s, 2)
        outputs = list(SHARED_OUTPUTS.values())
        ratios["shared_prefix_outputs_identical"] = float(outputs[0] == outputs[1])
    return ratios


def report(results: list[load.LevelResult], ratios: dict[str, float], info: dict[str, object]) -> dict[str, object]:
    print(f"\nmachine: {info['cpu']}, {info['cpu_cores']} cores; SIMD flags: {info['cpu_flags']}")
    print(f"fp32 matmul peak measured in this run: {ratios['matmul_peak_gflops']} GFLOP/s")
    print(f"{'run':<36}{'streams':>8}{'tok/s':>9}{'TTFT p50/p95 s':>17}{'ITL p50/p95 ms':>17}")
    for r in results:
        print(
            f"{r.name:<36}{r.concurrency:>8}{r.tokens_per_second:>9.1f}"
            f"{r.ttft_p50_s:>9.3f}/{r.ttft_p95_s:<7.3f}{r.itl_p50_ms:>9.1f}/{r.itl_p95_ms:<7.1f}"
        )
    print("\nratios (target in brackets):")
    for name, value in ratios.items():
        bound = TARGETS.get(name)
        verdict = ""
        if bound is not None:
            ok = value >= bound[0] if bound[1] == "min" else value <= bound[0]
            verdict = f"  [{'>=' if bound[1] == 'min' else '<='} {bound[0]}: {'met' if ok else 'MISSED'}]"
        print(f"  {name:<36}{value:>8}{verdict}")
    return {"machine": info, "results": [asdict(r) for r in results], "ratios": ratios}


def plot(results: list[load.LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("server", "o"), ("hf static batch", "s"), ("llama.cpp llama-server", "D")):
        runs = sorted((r for r in results if r.name == name), key=lambda r: r.concurrency)
        if runs:
            throughput.plot(
                [r.concurrency for r in runs], [r.tokens_per_second for r in runs], marker=marker, label=name
            )
    sequential = next(r.tokens_per_second for r in results if r.name == "hf sequential")
    throughput.axhline(sequential, color="gray", linestyle="--", label="hf sequential (batch 1)")
    throughput.set(xlabel="concurrent streams", ylabel="generated tokens/s", title="Throughput")
    throughput.legend()
    runs = sorted((r for r in results if r.name == "server"), key=lambda r: r.concurrency)
    levels = [r.concurrency for r in runs]
    latency.plot(levels, [r.ttft_p50_s * 1000 for r in runs], marker="o", label="TTFT p50")
    latency.plot(levels, [r.ttft_p95_s * 1000 for r in runs], marker="o", linestyle=":", label="TTFT p95")
    latency.plot(levels, [r.itl_p50_ms for r in runs], marker="^", label="inter-token p50")
    latency.plot(levels, [r.itl_p95_ms for r in runs], marker="^", linestyle=":", label="inter-token p95")
    latency.set(xlabel="concurrent streams", ylabel="ms", title="Latency through the server", yscale="log")
    latency.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    load.add_server_options(parser)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent streams to try")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--shared-prefix-tokens", type=int, default=600, help="shared system prompt, in tokens")
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests each stream sends in turn")
    parser.add_argument("--sequential-requests", type=int, default=3, help="requests for the batch-1 baseline")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement (server, HF); the median is kept")
    parser.add_argument("--adapters", type=int, default=4, help="adapters for the mixed-adapter run (0: skip it)")
    parser.add_argument("--adapter-rank", type=int, default=16)
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp (it is built on first use)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for JSON and PNG")
    args = parser.parse_args()

    model, tokenizer, folder = hf_model(args)
    fresh = FreshPrompts(tokenizer, args.prompt_tokens)
    system = prompts(tokenizer, 1, args.shared_prefix_tokens, start=999_999)[0]  # shares nothing with the rest
    print("measuring the matmul peak ...", flush=True)
    peak = matmul_peak_gflops(model.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        adapters = make_adapters(folder, Path(scratch), args.adapters, args.adapter_rank, ["q_proj", "v_proj"])
        results = measure_server(args, fresh, system, adapters)
    if not args.no_peer and args.model == "default":
        results += measure_peer(args, fresh)
    results += measure_hf(model, tokenizer, fresh.take(max(max(args.levels), args.sequential_requests)), args)
    info = machine() | {
        "model": args.model,
        "weights": str(model.dtype).removeprefix("torch."),
        "model_folder": folder.name,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "requests_per_stream": args.requests_per_stream,
        "adapters": args.adapters,
        "adapter_rank": args.adapter_rank,
        "repeats": args.repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    summary = report(results, ratios_of(results, peak, model), info)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if torch.cuda.is_available() else "cpu"
    (args.out / f"throughput-{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores"
    plot(
        results,
        args.out / f"throughput-{stem}.png",
        f"{folder.name} ({info['weights']}) on {where}; "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens",
    )
    print(f"\nwrote {args.out / f'throughput-{stem}.json'} and .png")


if __name__ == "__main__":
    main()
