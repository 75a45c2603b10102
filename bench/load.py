"""Load generators for the benchmarks: gRPC streams against a running loraserve, in a closed loop (N streams, each
sending its next request when the last one ends) or as Poisson arrivals (requests arrive over time at a given rate,
as a service sees them), with per-token timing; the server started as a subprocess; and the summary of a run."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraserve.client import Client, LoraserveRpcError
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

from common import percentile


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


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options of the served model that every benchmark which starts `loraserve serve` takes."""
    parser.add_argument("--model", default="default", help="model to serve (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model-cache", default=os.environ.get("LORASERVE_MODEL_CACHE", "~/.cache/loraserve/models"))
    parser.add_argument("--dtype", default="auto", help="weight dtype (for the baselines as well)")
    parser.add_argument("--kv-cache-memory", default="auto", help="the server's --kv-cache-memory")


def start_server(args: argparse.Namespace, adapters: list[Path], port: int, *extra: str) -> subprocess.Popen[bytes]:
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
        "--metrics-port",
        "0",
        "--max-batch-size",
        str(max(args.levels)),
        "--max-queued-requests",
        "256",
        "--log-level",
        "warning",
        "--dtype",
        args.dtype,
        "--kv-cache-memory",
        args.kv_cache_memory,
    ]
    for i, folder in enumerate(adapters):
        command += ["--adapter", f"a{i}={folder}"]
    command += extra
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


@dataclass
class StreamOutcome:
    """One streamed request as the client saw it."""

    timing: RequestTiming
    generated: int = 0
    inputs: int = 0
    cached: int = 0
    text: str = ""


async def stream_one(
    stub: pb_grpc.InferenceServiceStub,
    prompt: str,
    new_tokens: int,
    adapter: str,
    start: float | None = None,
    constraint: pb.OutputConstraint | None = None,
) -> StreamOutcome:
    """Stream one greedy request of exactly new_tokens tokens (unless a constraint completes first); `start` is when
    it arrived (default: now)."""
    request = pb.GenerateStreamRequest(
        prompt=prompt,
        adapter_id=adapter,
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
        constraint=constraint,
    )
    outcome = StreamOutcome(RequestTiming(start=start if start is not None else time.perf_counter()))
    texts = []
    async for response in stub.GenerateStream(request, timeout=600):
        outcome.timing.chunk_times.append(time.perf_counter())
        texts.append(response.text)
        outcome.generated, outcome.inputs = response.generated_token_count, response.input_token_count
        outcome.cached = response.cached_input_token_count
    outcome.text = "".join(texts)
    return outcome


async def drive(
    target: str,
    texts: list[str],
    concurrency: int,
    per_stream: int,
    new_tokens: int,
    adapters: list[str],
    constraint: pb.OutputConstraint | None = None,
) -> tuple[list[StreamOutcome], float]:
    """`concurrency` streams, each sending `per_stream` requests one after another (a closed loop)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def client(index: int) -> list[StreamOutcome]:
            results = []
            for k in range(per_stream):
                n = index * per_stream + k
                text, adapter = texts[n % len(texts)], adapters[n % len(adapters)]
                results.append(await stream_one(stub, text, new_tokens, adapter, constraint=constraint))
            return results

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(i) for i in range(concurrency)))
        return [r for results in per_client for r in results], time.perf_counter() - start


async def drive_poisson(
    target: str, texts: list[str], rate: float, new_tokens: int, seed: int = 0
) -> tuple[list[StreamOutcome], float]:
    """One request per text, arriving at exponential intervals (mean 1/rate seconds): an open loop, so a slow server
    faces a growing queue instead of fewer arrivals. TTFT counts from the arrival."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        start = time.perf_counter()
        arrivals, moment = [], 0.0
        for _ in texts:
            arrivals.append(moment)
            moment += rng.expovariate(rate)

        async def arrive(text: str, at: float) -> StreamOutcome:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await stream_one(stub, text, new_tokens, "", start=start + at)

        results = await asyncio.gather(*(arrive(t, at) for t, at in zip(texts, arrivals, strict=True)))
        return list(results), time.perf_counter() - start


def summarize(name: str, concurrency: int, results: list[StreamOutcome], seconds: float) -> LevelResult:
    tokens = sum(r.generated for r in results)
    ttfts = [r.timing.ttft for r in results]
    gaps = [gap for r in results for gap in r.timing.gaps]
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
        mean_input_tokens=round(sum(r.inputs for r in results) / len(results), 1),
    )
