"""Throughput and latency of loraserve against Hugging Face generate, side by side on one machine in one run.

Starts `loraserve serve` on the model, drives N concurrent gRPC streams (fixed prompts, min_new_tokens = max_new_tokens
so EOS cannot cut a run short) for each concurrency level, then a batch that mixes several LoRA adapters against the
same batch on the base model; stops the server; then measures the baselines on the same model: sequential
`model.generate` at batch 1 and static-batch `model.generate` at each concurrency level. Prints a table, writes JSON
and a PNG plot.

    .venv/bin/python bench/throughput.py                       # the default model, levels 1 4 16 32
    .venv/bin/python bench/throughput.py --levels 1 32 --requests-per-stream 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch

from loraserve.client import Client, LoraserveRpcError
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

from common import machine, make_adapters, percentile, prompts

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RequestTiming:
    start: float
    chunk_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


@dataclass
class LevelResult:
    name: str
    concurrency: int
    requests: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_ms: float
    itl_p95_ms: float
    mean_input_tokens: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, adapters: list[Path], port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "loraserve.cli",
        "serve",
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max(args.levels)),
        "--max-queued-requests",
        "256",
        "--log-level",
        "warning",
        "--dtype",
        args.dtype,
    ]
    for i, folder in enumerate(adapters):
        command += ["--adapter", f"a{i}={folder}"]
    server = subprocess.Popen(command)
    with Client(f"127.0.0.1:{port}") as client:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if client.health(timeout=1) == "SERVING":
                    return server
            except LoraserveRpcError:
                pass
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become SERVING")


async def stream_one(
    stub: pb_grpc.InferenceServiceStub, prompt: str, new_tokens: int, adapter: str
) -> tuple[RequestTiming, int, int]:
    request = pb.GenerateStreamRequest(
        prompt=prompt,
        adapter_id=adapter,
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
    )
    timing = RequestTiming(start=time.perf_counter())
    generated = inputs = 0
    async for response in stub.GenerateStream(request, timeout=600):
        timing.chunk_times.append(time.perf_counter())
        generated, inputs = response.generated_token_count, response.input_token_count
    return timing, generated, inputs


async def drive(
    target: str, texts: list[str], concurrency: int, per_stream: int, new_tokens: int, adapters: list[str]
) -> tuple[list[tuple[RequestTiming, int, int]], float]:
    """`concurrency` streams, each sending `per_stream` requests one after another (a closed loop)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def client(index: int) -> list[tuple[RequestTiming, int, int]]:
            results = []
            for k in range(per_stream):
                n = index * per_stream + k
                results.append(await stream_one(stub, texts[n % len(texts)], new_tokens, adapters[n % len(adapters)]))
            return results

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
        return [r for results in per_client for r in results], time.perf_counter() - start


def summarize(
    name: str, concurrency: int, results: list[tuple[RequestTiming, int, int]], seconds: float
) -> LevelResult:
    tokens = sum(generated for _, generated, _ in results)
    ttfts = [timing.ttft for timing, _, _ in results]
    gaps = [gap for timing, _, _ in results for gap in timing.gaps]
    return LevelResult(
        name=name,
        concurrency=concurrency,
        requests=len(results),
        generated_tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1),
        ttft_p50_s=round(percentile(ttfts, 50), 3),
        ttft_p95_s=round(percentile(ttfts, 95), 3),
        itl_p50_ms=round(1000 * percentile(gaps, 50), 1),
        itl_p95_ms=round(1000 * percentile(gaps, 95), 1),
        mean_input_tokens=round(sum(i for _, _, i in results) / len(results), 1),
    )


def measure_level(
    args: argparse.Namespace, target: str, texts: list[str], name: str, level: int, adapters: list[str]
) -> LevelResult:
    """The median run (by throughput) of --repeats runs: this machine's timing noise is about 10%."""
    runs = []
    for repeat in range(args.repeats):
        print(f"{name}: {level} concurrent streams (run {repeat + 1}/{args.repeats}) ...", flush=True)
        timings, seconds = asyncio.run(drive(target, texts, level, args.requests_per_stream, args.new_tokens, adapters))
        runs.append(summarize(name, level, timings, seconds))
    return sorted(runs, key=lambda r: r.tokens_per_second)[len(runs) // 2]


def measure_server(args: argparse.Namespace, texts: list[str], adapters: list[Path]) -> list[LevelResult]:
    port = free_port()
    server = start_server(args, adapters, port)
    target = f"127.0.0.1:{port}"
    results = []
    try:
        asyncio.run(drive(target, texts, 1, 1, 4, [""]))  # warm the server up
        for level in args.levels:
            results.append(measure_level(args, target, texts, "server", level, [""]))
        if adapters:
            names = [f"a{i}" for i in range(len(adapters))]
            label = f"server, {len(names)} adapters mixed"
            results.append(measure_level(args, target, texts, label, max(args.levels), names))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results


def hf_model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraserve.server.loading import resolve_model_folder

    folder, _ = resolve_model_folder(args.model, Path(args.model_cache))
    dtype = torch.float32 if args.dtype in ("auto", "float32") else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model, tokenizer, folder


@torch.inference_mode()
def measure_hf(
    model,
    tokenizer,
    texts: list[str],
    levels: list[int],
    new_tokens: int,
    sequential: int,  # type: ignore[no-untyped-def]
) -> list[LevelResult]:
    """Sequential generate at batch 1, and static-batch generate at every level above 1."""
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    model.generate(**tokenizer(texts[:1], return_tensors="pt"), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    results = []
    print(f"HF generate: {sequential} requests one after another ...", flush=True)
    start = time.perf_counter()
    for text in texts[:sequential]:
        model.generate(**tokenizer([text], return_tensors="pt"), **kwargs)
    seconds = time.perf_counter() - start
    results.append(_hf_result("hf sequential", 1, sequential, sequential * new_tokens, seconds))
    for level in levels:
        if level == 1:
            continue
        print(f"HF generate: static batch of {level} ...", flush=True)
        batch = tokenizer(texts[:level], return_tensors="pt", padding=True)
        start = time.perf_counter()
        model.generate(**batch, **kwargs)
        seconds = time.perf_counter() - start
        results.append(_hf_result("hf static batch", level, level, level * new_tokens, seconds))
    return results


def _hf_result(name: str, concurrency: int, requests: int, tokens: int, seconds: float) -> LevelResult:
    nan = float("nan")
    return LevelResult(
        name, concurrency, requests, tokens, round(seconds, 3), round(tokens / seconds, 1), nan, nan, nan, nan, nan
    )


def report(results: list[LevelResult], info: dict[str, object]) -> dict[str, object]:
    sequential = next(r.tokens_per_second for r in results if r.name == "hf sequential")
    static = {r.concurrency: r.tokens_per_second for r in results if r.name == "hf static batch"}
    server = {r.concurrency: r.tokens_per_second for r in results if r.name == "server"}
    mixed = [r for r in results if r.name.startswith("server,")]
    ratios: dict[str, float] = {}
    print(f"\nmachine: {info}")
    print(f"{'run':<28}{'streams':>8}{'tok/s':>9}{'xHF seq':>9}{'xHF static':>11}", end="")
    print(f"{'TTFT p50/p95 s':>17}{'ITL p50/p95 ms':>17}")
    for r in results:
        vs_static = r.tokens_per_second / static[r.concurrency] if r.concurrency in static else float("nan")
        print(
            f"{r.name:<28}{r.concurrency:>8}{r.tokens_per_second:>9.1f}{r.tokens_per_second / sequential:>9.2f}"
            f"{vs_static:>11.2f}{r.ttft_p50_s:>9.3f}/{r.ttft_p95_s:<7.3f}{r.itl_p50_ms:>9.1f}/{r.itl_p95_ms:<7.1f}"
        )
    for level, tps in server.items():
        ratios[f"server_{level}_vs_hf_sequential"] = round(tps / sequential, 2)
        if level in static:
            ratios[f"server_{level}_vs_hf_static_{level}"] = round(tps / static[level], 2)
    if 1 in server:
        ratios["server_1_vs_hf_generate"] = round(server[1] / sequential, 2)
    for r in mixed:
        ratios["mixed_adapters_vs_base"] = round(r.tokens_per_second / server[r.concurrency], 2)
    print("\nratios:", json.dumps(ratios, indent=1))
    return {"machine": info, "results": [asdict(r) for r in results], "ratios": ratios}


def plot(results: list[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("server", "o"), ("hf static batch", "s")):
        runs = sorted((r for r in results if r.name == name), key=lambda r: r.concurrency)
        throughput.plot([r.concurrency for r in runs], [r.tokens_per_second for r in runs], marker=marker, label=name)
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
    parser.add_argument("--model", default="default", help="model to serve and compare (default: SmolLM2-135M)")
    parser.add_argument("--model-cache", default=os.environ.get("LORASERVE_MODEL_CACHE", "~/.cache/loraserve/models"))
    parser.add_argument("--dtype", default="auto", help="weight dtype for both the server and the baselines")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent streams to try")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests each stream sends in turn")
    parser.add_argument("--sequential-requests", type=int, default=3, help="requests for the batch-1 baseline")
    parser.add_argument("--repeats", type=int, default=1, help="runs per server measurement; the median is kept")
    parser.add_argument("--adapters", type=int, default=4, help="adapters for the mixed-adapter run (0: skip it)")
    parser.add_argument("--adapter-rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for JSON and PNG")
    args = parser.parse_args()

    model, tokenizer, folder = hf_model(args)
    texts = prompts(tokenizer, max(args.levels) * args.requests_per_stream, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        adapters = make_adapters(folder, Path(scratch), args.adapters, args.adapter_rank, ["q_proj", "v_proj"])
        results = measure_server(args, texts, adapters)
    results += measure_hf(model, tokenizer, texts, args.levels, args.new_tokens, args.sequential_requests)
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
    summary = report(results, info)
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
