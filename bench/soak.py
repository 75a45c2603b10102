"""Soak: many clients send a fixed number of mixed requests to one `loraserve serve` process, in two identical rounds,
and every call must end with the status its case expects.

The mix: unary and streamed generations of random lengths (base model and adapters), streams cancelled at a random
chunk, streams whose deadline expires mid-stream, RagQuery over a stored collection, Tokenize, requests to an adapter
that a churn thread loads and unloads all the while, and a share of bad requests, each with the status it must get.
Beside them, the hostile mix: sampling parameters at the edges of their ranges (subnormals, the largest floats, NaN),
calls without a deadline, inputs just over the size limits, streams whose client stops reading (the server cancels
them after --client-stall-timeout), and choice-constrained generations whose output must be one of the choices.
A health check runs all the while: the server must be SERVING at every probe. After each round the server must be
idle (no active or queued request, no KV block in use); the second round's resident memory may grow at most
--max-rss-growth over the first's. The run prints p50/p99 latency per case and the count per status, writes them as
JSON, and exits 1 when a check fails.

    .venv/bin/python bench/soak.py --requests 2000 --clients 16           # the default model
    .venv/bin/python bench/soak.py --model /path/to/tiny --requests 300 --max-seconds 25 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

from common import CORPUS, machine, make_adapters, percentile
from load import add_server_options, free_port, start_server

OK = grpc.StatusCode.OK
COLLECTION = "soak"
CHURN_ADAPTER = "churn"
# Statuses no call may ever end with: they mean the server failed, not the request.
NEVER = {"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNIMPLEMENTED"}
# How long the server may take to become idle after a round (cancellations take effect at the next step).
IDLE_WAIT_S = 30.0
# (value, whether the server takes it) for each sampling number, as it arrives in the contract's 32-bit floats: 5e-324
# arrives as 0 (greedy for a temperature, outside (0, 1] for top_p), 1e-40 as a float32 subnormal, 1.8e308 as inf.
# The ranges: temperature 0 or [1e-5, 100]; repetition_penalty [0.01, 100]; top_p (0, 1].
EDGE_TEMPERATURES = [
    (0.0, True),
    (5e-324, True),
    (1e-5, True),
    (100.0, True),
    (1e-40, False),
    (1.7976931348623157e308, False),
    (float("nan"), False),
]
EDGE_PENALTIES = [(1.0, True), (0.01, True), (100.0, True), (1e-40, False), (3.4e38, False), (float("inf"), False)]
EDGE_TOP_P = [(1.0, True), (1e-40, True), (5e-324, False), (0.0, False), (float("nan"), False)]


@dataclass(frozen=True)
class Outcome:
    """One call as the client saw it."""

    case: str
    code: str
    seconds: float
    expected: bool
    detail: str = ""


@dataclass
class Stubs:
    inference: pb_grpc.InferenceServiceStub
    adapters: pb_grpc.AdapterServiceStub
    channel: grpc.Channel


def timed(case: str, expected: set[grpc.StatusCode], call: Callable[[], str]) -> Outcome:
    """Run one call; `call` returns a problem found in a successful answer ("" when there is none)."""
    start = time.perf_counter()
    try:
        problem = call()
        code = OK
    except grpc.RpcError as error:
        code, problem = error.code(), ""
        detail = error.details() or ""
    else:
        detail = problem
    seconds = time.perf_counter() - start
    return Outcome(case, code.name, seconds, code in expected and not problem, detail[:200])


def stopping(rng: random.Random, most: int) -> pb.StoppingCriteria:
    return pb.StoppingCriteria(max_new_tokens=rng.randint(1, most))


def prompt(rng: random.Random) -> str:
    start = rng.randrange(0, len(CORPUS) - 200)
    return CORPUS[start : start + rng.randint(20, 200)]


def finished_with_reason(responses: list[pb.GenerateStreamResponse]) -> str:
    if not responses or responses[-1].stop_reason == pb.STOP_REASON_UNSPECIFIED:
        return "a stream ended without a stop reason"
    return ""


class Mix:
    """The request cases; each takes its random numbers from the caller's generator, so a round repeats exactly."""

    def __init__(self, stubs: Stubs, adapters: list[str], most_tokens: int, max_sequence: int, stall_s: float) -> None:
        self.stubs = stubs
        self.adapters = adapters
        self.most_tokens = most_tokens
        self.max_sequence = max_sequence
        self.stall_s = stall_s  # the server's --client-stall-timeout
        self.limits = stubs.inference.ModelInfo(pb.ModelInfoRequest(), timeout=30).limits
        self.cases: list[tuple[str, float, Callable[[random.Random], Outcome]]] = [
            ("generate", 0.18, self.generate),
            ("stream", 0.16, self.stream),
            ("stream_cancelled", 0.10, self.stream_cancelled),
            ("stream_deadline", 0.10, self.stream_deadline),
            ("rag_query", 0.10, self.rag_query),
            ("tokenize", 0.10, self.tokenize),
            ("churn_adapter", 0.06, self.churn_adapter),
            ("bad_request", 0.10, self.bad_request),
            ("adapter_generate", 0.10, self.adapter_generate),
            ("edge_values", 0.06, self.edge_values),
            ("no_deadline", 0.04, self.no_deadline),
            ("over_the_limit", 0.03, self.over_the_limit),
            ("slow_reader", 0.03, self.slow_reader),
            ("constrained", 0.05, self.constrained),
        ]

    def pick(self, rng: random.Random) -> Callable[[random.Random], Outcome]:
        names = [c[2] for c in self.cases]
        return rng.choices(names, weights=[c[1] for c in self.cases])[0]

    def generate(self, rng: random.Random, adapter: str = "", case: str = "generate") -> Outcome:
        request = pb.GenerateRequest(
            prompt=prompt(rng),
            adapter_id=adapter,
            sampling=pb.SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1 << 30)),
            stopping=stopping(rng, self.most_tokens),
        )

        def call() -> str:
            response = self.stubs.inference.Generate(request, timeout=120)
            return "" if response.stop_reason != pb.STOP_REASON_UNSPECIFIED else "no stop reason"

        return timed(case, {OK}, call)

    def adapter_generate(self, rng: random.Random) -> Outcome:
        return self.generate(rng, rng.choice(self.adapters), "adapter_generate")

    def stream(self, rng: random.Random) -> Outcome:
        request = pb.GenerateStreamRequest(prompt=prompt(rng), stopping=stopping(rng, self.most_tokens))
        return timed(
            "stream",
            {OK},
            lambda: finished_with_reason(list(self.stubs.inference.GenerateStream(request, timeout=120))),
        )

    def stream_cancelled(self, rng: random.Random) -> Outcome:
        request = pb.GenerateStreamRequest(
            prompt=prompt(rng), stopping=pb.StoppingCriteria(max_new_tokens=self.most_tokens)
        )
        after = rng.randint(0, 8)

        def call() -> str:
            responses = self.stubs.inference.GenerateStream(request, timeout=120)
            for i, _ in enumerate(responses):
                if i == after:
                    responses.cancel()  # the next iteration raises CANCELLED
            return ""

        # CANCELLED is the client's own status; OK when the stream finished before the chosen chunk.
        return timed("stream_cancelled", {grpc.StatusCode.CANCELLED, OK}, call)

    def stream_deadline(self, rng: random.Random) -> Outcome:
        request = pb.GenerateStreamRequest(
            prompt=prompt(rng), stopping=pb.StoppingCriteria(max_new_tokens=self.most_tokens)
        )
        deadline = rng.uniform(0.05, 1.5)
        return timed(
            "stream_deadline",
            {grpc.StatusCode.DEADLINE_EXCEEDED, OK},
            lambda: finished_with_reason(list(self.stubs.inference.GenerateStream(request, timeout=deadline))),
        )

    def rag_query(self, rng: random.Random) -> Outcome:
        request = pb.RagQueryRequest(
            query=rng.choice(["How did printing change literacy?", "What did printers in Venice make?"]),
            collection=COLLECTION,
            top_k=2,
            stopping=stopping(rng, self.most_tokens),
        )

        def call() -> str:
            response = self.stubs.inference.RagQuery(request, timeout=120)
            return "" if response.sources else "RagQuery found no source"

        return timed("rag_query", {OK}, call)

    def tokenize(self, rng: random.Random) -> Outcome:
        text = prompt(rng)

        def call() -> str:
            response = self.stubs.inference.Tokenize(pb.TokenizeRequest(text=text), timeout=30)
            return "" if response.token_count > 0 else "no tokens"

        return timed("tokenize", {OK}, call)

    def churn_adapter(self, rng: random.Random) -> Outcome:
        # The churn thread loads and unloads it all the while: NOT_FOUND when it is away is the right answer.
        outcome = self.generate(rng, CHURN_ADAPTER, "churn_adapter")
        if outcome.code == "NOT_FOUND":
            return Outcome(outcome.case, outcome.code, outcome.seconds, True, outcome.detail)
        return outcome

    def bad_request(self, rng: random.Random) -> Outcome:
        inference = self.stubs.inference
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        too_long = " ".join(["word"] * (self.max_sequence * 2))
        bad: list[tuple[set[grpc.StatusCode], Callable[[], object]]] = [
            ({invalid}, lambda: inference.Generate(pb.GenerateRequest(), timeout=30)),
            (
                {grpc.StatusCode.NOT_FOUND},
                lambda: inference.Generate(pb.GenerateRequest(prompt="hi", adapter_id="nope"), timeout=30),
            ),
            (
                {invalid},
                lambda: inference.Generate(
                    pb.GenerateRequest(prompt="hi", stopping=pb.StoppingCriteria(max_new_tokens=10**8)), timeout=30
                ),
            ),
            (
                {invalid},
                lambda: inference.Generate(
                    pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1.0)), timeout=30
                ),
            ),
            ({invalid}, lambda: list(inference.GenerateStream(pb.GenerateStreamRequest(prompt=too_long), timeout=30))),
            (
                {grpc.StatusCode.NOT_FOUND},
                lambda: inference.RagQuery(pb.RagQueryRequest(query="q", collection="missing"), timeout=30),
            ),
            (
                {grpc.StatusCode.PERMISSION_DENIED},
                lambda: self.stubs.adapters.LoadAdapter(
                    pb.LoadAdapterRequest(adapter_id="escape", source="../outside"), timeout=30
                ),
            ),
            ({invalid}, lambda: self.raw_tokenize(b"\x0a\x02\xff\xfe")),  # TokenizeRequest.text, not UTF-8
        ]
        index = rng.randrange(len(bad))
        expected, call = bad[index]

        def run() -> str:
            call()
            return f"bad request {index} succeeded"

        return timed(f"bad_request_{index}", expected, run)

    # ---- the hostile mix ------------------------------------------------------------------------------------------

    def edge_values(self, rng: random.Random) -> Outcome:
        """Sampling numbers at the edges: each is either in its documented range (OK) or refused (INVALID_ARGUMENT);
        nothing in between may reach the sampler's arithmetic."""
        temperature, fine_t = rng.choice(EDGE_TEMPERATURES)
        penalty, fine_p = rng.choice(EDGE_PENALTIES)
        top_p, fine_top_p = rng.choice(EDGE_TOP_P)
        sampling = pb.SamplingParams(
            temperature=temperature, repetition_penalty=penalty, top_p=top_p, top_k=rng.choice([0, 1, 2**31 - 1])
        )
        request = pb.GenerateRequest(prompt=prompt(rng), sampling=sampling, stopping=stopping(rng, 8))
        expected = OK if fine_t and fine_p and fine_top_p else grpc.StatusCode.INVALID_ARGUMENT
        return timed("edge_values", {expected}, succeeds(lambda: self.stubs.inference.Generate(request, timeout=120)))

    def no_deadline(self, rng: random.Random) -> Outcome:
        """A call without a deadline (grpcurl's way): it must end like any other."""
        if rng.random() < 0.5:
            request = pb.GenerateRequest(prompt=prompt(rng), stopping=stopping(rng, 8))
            return timed("no_deadline", {OK}, succeeds(lambda: self.stubs.inference.Generate(request)))
        tokenize = pb.TokenizeRequest(text=prompt(rng))
        return timed("no_deadline", {OK}, succeeds(lambda: self.stubs.inference.Tokenize(tokenize)))

    def over_the_limit(self, rng: random.Random) -> Outcome:
        """Inputs just over the published limits, refused before any work: a prompt, a Tokenize text, inline
        documents."""
        huge = "x" * (self.limits.max_input_chars + 1)
        choice = rng.randrange(3)
        if choice == 0:
            call = lambda: self.stubs.inference.Generate(pb.GenerateRequest(prompt=huge), timeout=60)  # noqa: E731
        elif choice == 1:
            call = lambda: self.stubs.inference.Tokenize(pb.TokenizeRequest(text=huge), timeout=60)  # noqa: E731
        else:
            size = self.limits.max_rag_document_chars
            count = self.limits.max_request_document_chars // size + 1
            documents = [pb.Document(id=f"d{i}", text="y" * size) for i in range(count)]
            rag = pb.RagQueryRequest(query="q", documents=documents)
            call = lambda: self.stubs.inference.RagQuery(rag, timeout=60)  # noqa: E731
        return timed("over_the_limit", {grpc.StatusCode.INVALID_ARGUMENT}, succeeds(call))

    def slow_reader(self, rng: random.Random) -> Outcome:
        """A stream with large messages whose client takes the first, then stops reading for up to twice the
        server's --client-stall-timeout: OK when its output fit in flight, CANCELLED when the server gave up."""
        request = pb.GenerateStreamRequest(
            prompt=prompt(rng),
            stopping=pb.StoppingCriteria(max_new_tokens=self.most_tokens),
            response=pb.ResponseOptions(top_n=min(20, self.limits.max_top_n), logprobs=True, input_tokens=True),
        )
        pause = rng.uniform(0, 2 * self.stall_s)

        def call() -> str:
            responses = self.stubs.inference.GenerateStream(request, timeout=120)
            first = next(responses)
            time.sleep(pause)
            return finished_with_reason([first, *responses])

        return timed("slow_reader", {OK, grpc.StatusCode.CANCELLED}, call)

    def constrained(self, rng: random.Random) -> Outcome:
        """A choice constraint must hold on every request, the first after start-up included."""
        choices = rng.sample(["yes", "no", "unsure", "maybe", "red", "green", "blue"], k=rng.randint(2, 4))
        request = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=f"{prompt(rng)} Answer with one of {', '.join(choices)}.")],
            constraint=pb.OutputConstraint(choice=pb.Choices(values=choices)),
            sampling=pb.SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(1 << 30)),
        )

        return timed(
            "constrained", {OK}, lambda: off_the_choices(self.stubs.inference.Generate(request, timeout=120), choices)
        )

    def raw_tokenize(self, payload: bytes) -> object:
        method = self.stubs.channel.unary_unary(
            "/loraserve.v1.InferenceService/Tokenize", request_serializer=None, response_deserializer=None
        )
        return method(payload, timeout=30)


def off_the_choices(response: pb.GenerateResponse, choices: list[str]) -> str:
    """What is wrong with a choice-constrained answer: a complete one must be a choice, a cut-off one the start of
    one ("" when it is right)."""
    complete = response.stop_reason == pb.STOP_REASON_CONSTRAINT_COMPLETE
    if (response.text in choices) if complete else any(c.startswith(response.text) for c in choices):
        return ""
    return f"constrained output {response.text!r} is not {'one' if complete else 'the start of one'} of {choices}"


def succeeds(call: Callable[[], object]) -> Callable[[], str]:
    """A call whose answer needs no checking beyond its status."""

    def run() -> str:
        call()
        return ""

    return run


def churn(stubs: Stubs, source: str, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """Load and unload one adapter over and over while traffic runs; each call must succeed."""
    load = pb.LoadAdapterRequest(adapter_id=CHURN_ADAPTER, source=source)
    unload = pb.UnloadAdapterRequest(adapter_id=CHURN_ADAPTER)
    while not stop.is_set():
        outcomes.append(timed("load_adapter", {OK}, succeeds(lambda: stubs.adapters.LoadAdapter(load, timeout=60))))
        stop.wait(0.3)
        outcomes.append(
            timed("unload_adapter", {OK}, succeeds(lambda: stubs.adapters.UnloadAdapter(unload, timeout=60)))
        )
        stop.wait(0.2)


def run_round(stubs: Stubs, mix: Mix, args: argparse.Namespace, churn_source: str) -> tuple[list[Outcome], float]:
    rng = random.Random(args.seed)
    plans = [(mix.pick(rng), random.Random(rng.randrange(1 << 30))) for _ in range(args.requests)]
    churn_outcomes: list[Outcome] = []
    stop = threading.Event()
    churner = threading.Thread(target=churn, args=(stubs, churn_source, stop, churn_outcomes), daemon=True)
    end = time.monotonic() + args.max_seconds
    start = time.perf_counter()
    churner.start()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [pool.submit(lambda p=plan: p[0](p[1]) if time.monotonic() < end else None) for plan in plans]
        outcomes = [r for r in (f.result() for f in results) if r is not None]
    stop.set()
    churner.join(timeout=120)
    return outcomes + churn_outcomes, time.perf_counter() - start


class HealthWatch:
    """Probes grpc.health.v1 every half second while a round runs: the server must be SERVING at every probe."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.probes = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self.probes += 1
            try:
                status = self.stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            except grpc.RpcError:
                status = None
            self.failures += status != health_pb2.HealthCheckResponse.SERVING


def wait_idle(stubs: Stubs) -> pb.ServerStats:
    end = time.monotonic() + IDLE_WAIT_S
    while True:
        stats = stubs.inference.ModelInfo(pb.ModelInfoRequest(), timeout=30).stats
        idle = stats.active_requests == 0 and stats.queued_requests == 0 and stats.kv_cache_used_blocks == 0
        if idle or time.monotonic() > end:
            return stats
        time.sleep(0.1)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/PID/status")


def summarize(outcomes: list[Outcome]) -> dict[str, object]:
    by_case: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        by_case["bad_request" if o.case.startswith("bad_request") else o.case].append(o.seconds)
    return {
        "calls": len(outcomes),
        "statuses": dict(Counter(o.code for o in outcomes).most_common()),
        "latency_s": {
            case: {"calls": len(s), "p50": round(percentile(s, 50), 4), "p99": round(percentile(s, 99), 4)}
            for case, s in sorted(by_case.items())
        },
        "unexpected": [asdict(o) for o in outcomes if not o.expected][:50],
        "unexpected_count": sum(not o.expected for o in outcomes),
    }


def prepare(stubs: Stubs) -> None:
    """The first request after start-up, constrained (a constraint must hold on it too), then the collection RagQuery
    reads."""
    choices = ["yes", "no", "unsure"]
    first = pb.GenerateRequest(
        messages=[pb.Message(role="user", content="Is the sky green?")],
        constraint=pb.OutputConstraint(choice=pb.Choices(values=choices)),
    )
    problem = off_the_choices(stubs.inference.Generate(first, timeout=120), choices)
    if problem:
        raise SystemExit(f"the first request after start-up: {problem}")
    paragraphs = [p.strip() + "." for p in CORPUS.split(". ") if p.strip()]
    documents = [pb.Document(id=f"doc-{i}", text=p) for i, p in enumerate(paragraphs)]
    collections = pb_grpc.CollectionServiceStub(stubs.channel)
    collections.UpsertDocuments(pb.UpsertDocumentsRequest(collection=COLLECTION, documents=documents), timeout=300)


def print_table(rounds: list[dict[str, object]]) -> None:
    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_cores']} cores); flags: {info['cpu_flags']}")
    for n, summary in enumerate(rounds, start=1):
        print(f"\nround {n}: {summary['calls']} calls in {summary['seconds']} s; statuses {summary['statuses']}")
        print(f"{'case':<20} {'calls':>6} {'p50 ms':>9} {'p99 ms':>9}")
        for case, row in summary["latency_s"].items():  # type: ignore[union-attr]
            print(f"{case:<20} {row['calls']:>6} {1000 * row['p50']:>9.1f} {1000 * row['p99']:>9.1f}")
        print(f"resident memory after the round: {summary['rss_mib']} MiB")
        print(
            f"health probes during the round: {summary['health_probes']}, not SERVING: {summary['not_serving_probes']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_server_options(parser)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--max-seconds", type=float, default=600, help="a round stops sending after this long")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest generation asked for")
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=2, help="adapters loaded at start (plus one churned)")
    parser.add_argument("--adapter-targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="allowed growth of round 2 over round 1")
    parser.add_argument(
        "--client-stall-timeout", type=float, default=2.0, help="the server's: slow readers wait up to twice it"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loraserve-soak-"))
    from loraserve.server.models.loading import resolve_model_folder

    folder, _ = resolve_model_folder(args.model, Path(args.model_cache).expanduser())
    print(f"making {args.adapters + 1} adapters for {folder}", flush=True)
    adapters = make_adapters(folder, work / "adapters", args.adapters + 1, 4, args.adapter_targets)
    port = free_port()
    args.levels = [args.clients]  # start_server sizes the batch from it
    server = start_server(
        args,
        adapters[:-1],
        port,
        "--adapter-root",
        str(work / "adapters"),
        "--max-adapters",
        str(args.adapters + 2),
        "--rag-store",
        str(work / "collections"),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--default-max-new-tokens",
        str(args.max_new_tokens),
        "--max-sequence-length",
        str(args.max_sequence_length),
        "--max-queued-requests",
        str(4 * args.clients),
        "--client-stall-timeout",
        str(args.client_stall_timeout),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stubs = Stubs(pb_grpc.InferenceServiceStub(channel), pb_grpc.AdapterServiceStub(channel), channel)
    names = [f"a{i}" for i in range(args.adapters)]
    mix = Mix(stubs, names, args.max_new_tokens, args.max_sequence_length, args.client_stall_timeout)
    rounds: list[dict[str, object]] = []
    failures: list[str] = []
    try:
        prepare(stubs)
        for n in (1, 2):
            print(f"round {n}: {args.requests} requests from {args.clients} clients", flush=True)
            with HealthWatch(channel) as health_watch:
                outcomes, seconds = run_round(stubs, mix, args, adapters[-1].name)
            stats = wait_idle(stubs)
            summary = summarize(outcomes) | {"seconds": round(seconds, 1)}
            summary["rss_mib"] = round(resident_bytes(server.pid) / 2**20, 1)
            summary["idle_after"] = {
                "active_requests": stats.active_requests,
                "queued_requests": stats.queued_requests,
                "kv_cache_used_blocks": stats.kv_cache_used_blocks,
            }
            summary["health_probes"] = health_watch.probes
            summary["not_serving_probes"] = health_watch.failures
            rounds.append(summary)
            if health_watch.failures:
                failures.append(f"round {n}: {health_watch.failures} health probes were not SERVING")
            if summary["unexpected_count"]:
                failures.append(f"round {n}: {summary['unexpected_count']} calls ended unexpectedly")
            if NEVER & set(summary["statuses"]):  # type: ignore[arg-type]
                failures.append(f"round {n}: statuses {sorted(NEVER & set(summary['statuses']))}")
            if any(summary["idle_after"].values()):  # type: ignore[union-attr]
                failures.append(f"round {n}: not idle after the round: {summary['idle_after']}")
        growth = rounds[1]["rss_mib"] / rounds[0]["rss_mib"] - 1  # type: ignore[operator]
        if growth > args.max_rss_growth:
            failures.append(f"resident memory grew {growth:.1%} from round 1 to round 2")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            failures.append("the server is not SERVING after the soak")
    finally:
        channel.close()
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    print_table(rounds)
    result = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "rounds": rounds,
        "rss_growth": round(growth, 4),
        "failures": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresident memory growth, round 2 over round 1: {growth:+.1%}")
    print("\n".join(["FAILED:", *failures]) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
