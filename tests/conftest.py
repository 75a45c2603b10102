"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama built from a config, LoRA adapters for it, and
in-process servers on free loopback ports."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from loraserve.client import Client
from loraserve.config import EngineConfig, ModelConfig, RagConfig, ServerConfig

TINY_ADAPTERS = {"alpha": 4, "beta": 8}  # id -> rank: adapters of different ranks coexist


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and every server or script it starts) gets its share of the cores for torch's
    threads (at least one): workers of two threads each on a 2-core machine would spend their time switching."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)


# The longest test files, longest first: collected first, they start first on the xdist workers, so that the suite
# does not end with one worker still training while the other waits.
LONGEST_FIRST = (
    "tests/test_demo.py",
    "tests/test_bench.py",
    "tests/server/test_fuzz.py",
    "tests/test_cli.py",
    "tests/test_soak.py",
    "tests/test_chaos.py",
    "tests/server/properties/test_generation.py",
    "tests/server/properties/test_http.py",
    "tests/server/properties/test_services.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Where the default model's safetensors conversion is cached (the server's own default unless overridden)."""
    return Path(os.environ.get("LORASERVE_MODEL_CACHE", "~/.cache/loraserve/models")).expanduser()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Path:
    """The default model's real tokenizer (SmolLM2, with its chat template), saved as a plain folder. Read from the
    model's cached conversion (made once, on first use): reading it out of the GGUF file takes seconds each time."""
    from transformers import AutoTokenizer

    from loraserve.server.models.loading import resolve_model_folder

    folder, _ = resolve_model_folder("default", model_cache_dir)
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """LoRA adapters for the tiny model (q/v projections), with random non-zero B so they change the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    dirs = {}
    for seed, (name, rank) in enumerate(TINY_ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base, config)
        out = tmp_path_factory.mktemp(f"adapter-{name}")
        peft_model.save_pretrained(out)
        dirs[name] = out
    return dirs


@pytest.fixture(scope="session")
def tiny_model_config(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> ModelConfig:
    return ModelConfig(
        model=str(tiny_model_dir),
        adapter=tuple(f"{name}={path}" for name, path in adapter_dirs.items()),
        device="cpu",
        max_sequence_length=256,  # the model could take 1024; a short context makes the limits easy to reach
    )


ServerFactory = Callable[..., "RunningServer"]
# The KV cache of the tests' servers on the default model: 11,000 tokens, more than its 8,192-token context, instead
# of the automatic 2 GiB that every one of them would allocate and zero.
DEFAULT_MODEL_TEST_KV = "512MB"


class RunningServer:
    """An in-process LoraServer on a free 127.0.0.1 port, with a client for it. Its collections live in a temporary
    folder unless rag_options name one."""

    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        load: bool = True,
        server_options: dict | None = None,
        client_options: dict | None = None,
        rag_options: dict | None = None,
    ) -> None:
        from loraserve.server.app import LoraServer

        options = {"host": "127.0.0.1", "port": 0, "grace_period": 5.0, "metrics_port": 0} | (server_options or {})
        server_config = ServerConfig(**options)
        self._store = tempfile.TemporaryDirectory(prefix="loraserve-collections-")
        rag_config = RagConfig(**({"rag_store": self._store.name} | (rag_options or {})))
        self.server = LoraServer(model_config, engine_config, server_config, rag_config)
        self.port = self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        if load:
            self.server.load()
        self.client = Client(self.target, timeout=60, **(client_options or {}))

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self._store.cleanup()


@pytest.fixture
def start_server(tiny_model_config: ModelConfig) -> Iterator[ServerFactory]:
    """Start servers on the tiny model with custom settings; all are stopped after the test."""
    started: list[RunningServer] = []

    def start(
        load: bool = True,
        model_config: ModelConfig | None = None,
        server_options: dict | None = None,
        client_options: dict | None = None,
        rag_options: dict | None = None,
        **engine_options: object,
    ) -> RunningServer:
        if model_config is None:  # the tiny model needs little cache; the automatic size would take 2 GiB each
            engine_options.setdefault("kv_cache_memory", "64MB")
        engine_config = replace(EngineConfig(), **engine_options)
        running = RunningServer(
            model_config or tiny_model_config, engine_config, load, server_options, client_options, rag_options
        )
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_config: ModelConfig) -> Iterator[RunningServer]:
    """One server on the tiny model (with adapters alpha and beta), shared by the tests that do not change it."""
    running = RunningServer(
        tiny_model_config,
        EngineConfig(max_batch_size=8, max_new_tokens=64, default_max_new_tokens=32, kv_cache_memory="64MB"),
    )
    yield running
    running.close()


@pytest.fixture(scope="session")
def tiny_http_server(tiny_model_config: ModelConfig, free_port: Callable[[], int]) -> Iterator[RunningServer]:
    """Like tiny_server, with the OpenAI-compatible HTTP API on a free port as well."""
    running = RunningServer(
        tiny_model_config,
        EngineConfig(max_batch_size=8, max_new_tokens=64, default_max_new_tokens=32, kv_cache_memory="64MB"),
        server_options={"http_port": free_port()},
    )
    yield running
    running.close()


@pytest.fixture(scope="session")
def default_server(model_cache_dir: Path) -> Iterator[RunningServer]:
    """A server on the real default model (SmolLM2-135M-Instruct), converted once into the model cache."""
    config = ModelConfig(model="default", model_cache=str(model_cache_dir), device="cpu")
    running = RunningServer(config, EngineConfig(kv_cache_memory=DEFAULT_MODEL_TEST_KV))
    yield running
    running.close()


@pytest.fixture(scope="session")
def s3_endpoint(free_port: Callable[[], int]) -> Iterator[str]:
    """moto's standalone S3 server on a free 127.0.0.1 port, for boto3 over real HTTP."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the AWS environment pointing boto3 at the moto server."""
    import time

    from loraserve.storage import s3_client

    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    name = f"bucket-{time.monotonic_ns()}"
    s3_client().create_bucket(Bucket=name)
    return name


class FaultyS3Proxy:
    """A TCP proxy on 127.0.0.1 in front of moto's S3 server that misbehaves on GETs of keys containing `target`:
    mode "pass" forwards everything; "drop" sends the first `drop_after` bytes of such a response and then closes the
    connection (every time, or only the first time with `times=1`); "slow" waits `delay` seconds before the response.
    `hits` counts the GETs it misbehaved on."""

    def __init__(self, upstream: str) -> None:
        import socket
        import threading

        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.mode, self.target, self.drop_after, self.delay, self.times = "pass", "", 1024, 0.0, 0
        self.hits = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def misbehave(self, mode: str, target: str, *, drop_after: int = 1024, delay: float = 0.0, times: int = 0) -> None:
        with self._lock:
            self.mode, self.target, self.drop_after, self.delay, self.times = mode, target, drop_after, delay, times
            self.hits = 0

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            state = {"fault": "", "sent": 0}
            threading.Thread(target=self._requests, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, state), daemon=True).start()

    def _requests(self, client, server, state: dict) -> None:  # type: ignore[no-untyped-def]
        import re

        while data := self._receive(client):
            for method, path in re.findall(rb"^(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1", data, re.MULTILINE):
                with self._lock:
                    faulty = self.mode != "pass" and method == b"GET" and self.target.encode() in path
                    faulty = faulty and (not self.times or self.hits < self.times)
                    self.hits += faulty
                    state["fault"], state["sent"] = (self.mode if faulty else ""), 0
            if not self._send(server, data):
                break
        self._close(client, server)

    def _responses(self, server, client, state: dict) -> None:  # type: ignore[no-untyped-def]
        import time

        while data := self._receive(server):
            fault = state["fault"]
            if fault == "slow":
                time.sleep(self.delay)
                state["fault"] = ""
            elif fault == "drop" and state["sent"] + len(data) >= self.drop_after:
                self._send(client, data[: self.drop_after - state["sent"]])
                break
            state["sent"] += len(data)
            if not self._send(client, data):
                break
        self._close(client, server)

    @staticmethod
    def _receive(sock) -> bytes:  # type: ignore[no-untyped-def]
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _send(sock, data: bytes) -> bool:  # type: ignore[no-untyped-def]
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False

    @staticmethod
    def _close(*sockets) -> None:  # type: ignore[no-untyped-def]
        import socket

        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            self._close(*self._sockets)


@pytest.fixture
def faulty_s3(bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3Proxy]:
    """A misbehaving proxy in front of moto (see FaultyS3Proxy), with AWS_ENDPOINT_URL pointing at it."""
    proxy = FaultyS3Proxy(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def embedder():
    """The real embedding model (all-MiniLM-L6-v2 from its package), loaded once."""
    from loraserve.server.retrieval.embedding import Embedder

    model = Embedder("default")
    yield model
    model.close()


# Ports the tests hand out: below the kernel's ephemeral range (where bind(0) and outgoing connections take theirs),
# a block of its own for each pytest-xdist worker, each port handed out once. So no two tests, and no two workers,
# ever pick the same port, and a port picked to stay closed stays closed.
PORT_BASE = 20_000
PORTS_PER_WORKER = 1_000


@pytest.fixture(scope="session")
def free_port(worker_id: str) -> Callable[[], int]:
    """A function that hands out a free 127.0.0.1 port no other test of this run gets."""
    import itertools
    import socket

    worker = int(worker_id.removeprefix("gw")) if worker_id.startswith("gw") else 0
    first = PORT_BASE + worker * PORTS_PER_WORKER
    candidates = itertools.count(first)

    def pick() -> int:
        for port in candidates:
            assert port < first + PORTS_PER_WORKER, "this worker used up its block of ports"
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:  # something outside the tests has it
                    continue
            return port
        raise AssertionError("unreachable")

    return pick


@pytest.fixture(scope="session")
def wait_for_health() -> Callable[..., list[str]]:
    """A function that polls a `loraserve serve` process's health until it reports `wanted` (bounded, and only while
    the process runs); it returns the statuses seen."""
    import time

    from loraserve.client import LoraserveRpcError

    def wait(client: Client, wanted: str, process, timeout: float = 120.0) -> list[str]:  # type: ignore[no-untyped-def]
        seen: list[str] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end and process.poll() is None:
            try:
                seen.append(client.health(timeout=1))
            except LoraserveRpcError as error:
                seen.append(error.code.name)
            if seen[-1] == wanted:
                return seen
            time.sleep(0.05)
        raise AssertionError(f"health never became {wanted}; saw {seen[-5:]}; server exit code {process.poll()}")

    return wait


# ---- waiting for what a test waits for, never for a time -----------------------------------------------------------

# Far above how long anything it bounds takes, even on a slow, busy 2-core CI machine, and under pytest-timeout's 300 s:
# it only turns a hang into a failure that says so. No test asserts a timing.
HANG_GUARD_S = 120.0


def wait_for(condition: Callable[[], object], what: str, guard: float = HANG_GUARD_S) -> None:
    """Poll until condition() is true. The bound is a hang guard, not a speed check: it fails only when `what` never
    happens, however slow the machine."""
    end = time.monotonic() + guard
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"hang guard: still waiting, after {guard:.0f} s, for {what}")
        time.sleep(0.01)


class EngineGate:
    """Holds an engine's thread at the start of a model step, so that a test decides what happens between two steps
    instead of racing the engine: a sleep in every step only makes the race unlikely, and a busy machine still loses
    it. hold_when(condition): from then on, before each step, the engine waits while condition() is true (a step it
    waits before is already planned: its rows get their token when it goes on). release() lets it run freely.

    It also counts the steps taken (`steps`, and `batches`: the rows of each) and the request ids the engine was asked
    to cancel (`cancelled`: install the gate before submitting, since a request's stream keeps the engine's cancel).
    Use it as a context manager: leaving releases the engine, so that a failing test never leaves it stuck, and
    fails the test if the engine was held past the hang guard."""

    def __init__(self, engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.steps = 0
        self.batches: list[int] = []
        self.cancelled: list[str] = []
        self.held = False
        self.hung = False
        self._hold: Callable[[], object] | None = None
        self._changed = threading.Condition()
        step, cancel = engine.executor.forward, engine.cancel

        def gated_step(work):  # type: ignore[no-untyped-def]
            self._wait_at_gate(len(work))
            return step(work)

        def watched_cancel(request_id: str) -> None:
            self.cancelled.append(request_id)
            cancel(request_id)

        monkeypatch.setattr(engine.executor, "forward", gated_step)
        monkeypatch.setattr(engine, "cancel", watched_cancel)

    def _wait_at_gate(self, rows: int) -> None:
        end = time.monotonic() + HANG_GUARD_S
        with self._changed:
            while self._hold is not None and self._hold():
                if time.monotonic() > end:  # the test never let it go: go on, and fail the test on leaving
                    self.hung, self._hold = True, None
                    break
                self.held = True
                self._changed.notify_all()
                self._changed.wait(0.01)  # the condition may change without a word to the gate: look again soon
            self.held = False
            self.steps += 1
            self.batches.append(rows)

    def hold_when(self, condition: Callable[[], object] | None) -> None:
        with self._changed:
            self._hold = condition
            self.held = False  # until the engine finds the new condition true
            self._changed.notify_all()

    def hold_after_tokens(self, count: int, until_cancelled: bool = False) -> None:
        """Hold the engine before its next step once it has generated `count` more tokens (its requests together):
        until release(), or with until_cancelled until the engine is asked to cancel a request."""
        first = self.engine.stats().generated_tokens

        def holding() -> bool:
            if until_cancelled and self.cancelled:
                return False
            return self.engine.stats().generated_tokens >= first + count

        self.hold_when(holding)

    def release(self) -> None:
        self.hold_when(None)

    def wait_held(self, what: str) -> None:
        """Wait until the engine waits at the gate; `what` says what the test waits for."""
        wait_for(lambda: self.held, what)

    def __enter__(self) -> EngineGate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        if self.hung and exc_info[0] is None:
            raise AssertionError(f"hang guard: the engine was held at the gate for {HANG_GUARD_S:.0f} s")
