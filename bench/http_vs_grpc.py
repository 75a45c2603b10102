"""The OpenAI-compatible HTTP API against gRPC on the same server, side by side in one run.

`loraserve serve --http-port` on the model; 16 concurrent streams over gRPC (GenerateStream) and 16 over HTTP
(/v1/completions with stream: true, server-sent events), alternating, each run with fresh prompts, every request a
greedy raw prompt of exactly --new-tokens tokens. Reports aggregate throughput, the HTTP/gRPC ratio, and the time to
first token each protocol sees (the HTTP figure includes its JSON and SSE framing). Prints the machine with the table.

    .venv/bin/python bench/http_vs_grpc.py
    .venv/bin/python bench/http_vs_grpc.py --repeats 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

import load
from common import FreshPrompts, machine

ROOT = Path(__file__).resolve().parent.parent


async def http_stream_one(http: httpx.AsyncClient, model: str, prompt: str, new_tokens: int) -> load.StreamOutcome:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome = load.StreamOutcome(load.RequestTiming(start=time.perf_counter()))
    texts = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["choices"]:
                outcome.timing.chunk_times.append(time.perf_counter())
                texts.append(event["choices"][0]["text"])
            else:
                outcome.generated = event["usage"]["completion_tokens"]
                outcome.inputs = event["usage"]["prompt_tokens"]
    outcome.text = "".join(texts)
    return outcome


async def drive_http(base_url: str, model: str, texts: list[str], new_tokens: int) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(http_stream_one(http, model, t, new_tokens) for t in texts))
        return list(results), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    load.add_server_options(parser)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per protocol; the medians are compared")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON")
    args = parser.parse_args()
    args.levels = [args.streams]  # load.start_server sizes the batch from it

    from transformers import AutoTokenizer

    from loraserve.client import Client
    from loraserve.server.models.loading import resolve_model_folder

    folder, _ = resolve_model_folder(args.model, Path(args.model_cache).expanduser())
    fresh = FreshPrompts(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
    info = machine() | {"model": args.model, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"{info['cpu']} ({info['cpu_cores']} cores; {info['cpu_flags']})")
    port, http_port = load.free_port(), load.free_port()
    server = load.start_server(args, [], port, "--http-port", str(http_port))
    target, base_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    runs: dict[str, list[load.LevelResult]] = {"grpc": [], "http": []}
    try:
        with Client(target) as client:
            model = client.model_info().model_name
        asyncio.run(load.drive(target, fresh.take(1), 1, 1, 4, [""]))  # warm both paths up
        asyncio.run(drive_http(base_url, model, fresh.take(1), 4))
        for repeat in range(args.repeats):
            for name in ("grpc", "http"):
                print(f"{name}: {args.streams} streams (run {repeat + 1}/{args.repeats}) ...", flush=True)
                texts = fresh.take(args.streams)
                if name == "grpc":
                    outcomes, seconds = asyncio.run(load.drive(target, texts, args.streams, 1, args.new_tokens, [""]))
                else:
                    outcomes, seconds = asyncio.run(drive_http(base_url, model, texts, args.new_tokens))
                runs[name].append(load.summarize(name, args.streams, outcomes, seconds))
    finally:
        server.terminate()
        server.wait(timeout=60)
    median = {name: statistics.median(r.tokens_per_second for r in results) for name, results in runs.items()}
    ttft = {name: statistics.median(r.ttft_p50_s for r in results) for name, results in runs.items()}
    summary = {
        "machine": info,
        "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
        "grpc_tokens_per_second": median["grpc"],
        "http_tokens_per_second": median["http"],
        "http_vs_grpc": round(median["http"] / median["grpc"], 3),
        "grpc_ttft_p50_s": ttft["grpc"],
        "http_ttft_p50_s": ttft["http"],
        "http_added_ttft_ms": round(1000 * (ttft["http"] - ttft["grpc"]), 1),
    }
    print(f"\n{'protocol':10} {'tok/s (median)':>15} {'TTFT p50 s':>11}")
    for name in ("grpc", "http"):
        print(f"{name:10} {median[name]:>15} {ttft[name]:>11}")
    print(f"HTTP/gRPC throughput {summary['http_vs_grpc']}x; HTTP adds {summary['http_added_ttft_ms']} ms TTFT")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "http-vs-grpc-cpu.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
