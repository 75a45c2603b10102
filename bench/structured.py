"""Structured output: what constrained decoding costs, side by side on one machine in one run.

1. Token-mask libraries, with the model's tokenizer: 32 rows, each following its own JSON schema from
   bench/data/json-schemas.json along a valid document of that schema, the rows at different positions; every step
   computes the next-token mask of all 32 rows, then each row takes its document's next token. Reported per step (the
   whole batch) and per schema compilation: llguidance as loraserve applies it (masks, unpacked onto the [32, vocab]
   scores), llguidance's mask computation alone, xgrammar (row by row, and its batch matcher) and outlines-core (row
   by row). `make setup` installs the last two (with --no-deps: xgrammar's declared triton is for CUDA only).
2. The engine: `loraserve serve` on the model, 32 concurrent gRPC streams all JSON-constrained (a schema whose
   documents are longer than the token budget, so every row runs its full budget like a free row) and the same
   unconstrained (min_new_tokens = max_new_tokens), alternating, fresh prompts each time; the throughput ratio and the
   engine's own per-step mask cost from ModelInfo's stats.

    .venv/bin/python bench/structured.py                   # the default model
    .venv/bin/python bench/structured.py --repeats 1 --new-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from loraserve.client import Client
from loraserve.server.engine.constraints import ConstraintCompiler, RowConstraint, apply_masks
from loraserve.server.engine.params import ConstraintKind, OutputConstraint
from loraserve.v1 import inference_pb2 as pb

import load
from common import FreshPrompts, machine

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "bench" / "data" / "json-schemas.json"
BATCH = 32
# Documents of this schema are arrays of at least 64 objects: far longer than any token budget here, so a
# constrained row runs to max_new_tokens like a free one and the two runs generate the same number of tokens.
LONG_SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "score": {"type": "number"}},
        "required": ["id", "name", "score"],
        "additionalProperties": False,
    },
}


def load_corpus() -> list[dict[str, Any]]:
    return json.loads(CORPUS.read_text())


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Rows:
    """The documents' tokens and each row's position in its document (rows start at different positions). Row i
    follows schema i % len(schemas)."""

    def __init__(self, tokenizer, corpus: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
        self.schemas = corpus[:BATCH]  # compiled once each
        self.entries = [corpus[i % len(corpus)] for i in range(BATCH)]
        self.docs = [tokenizer.encode(compact(e["example"]), add_special_tokens=False) for e in self.entries]
        self.start = [i % len(d) for i, d in enumerate(self.docs)]


def measure_steps(
    rows: Rows,
    steps: int,
    fresh: Callable[[int], Any],
    masks: Callable[[list[Any]], None],
    advance: Callable[[Any, int], bool],
) -> float:
    """Mean seconds per batch mask step. fresh(i): a new matcher for row i; masks(matchers): compute the batch's
    masks; advance(matcher, token): take a token (False when refused: the row starts over)."""
    matchers = [fresh(i) for i in range(BATCH)]
    position = [0] * BATCH
    for i in range(BATCH):  # move each row to its start position (untimed)
        for token in rows.docs[i][: rows.start[i]]:
            advance(matchers[i], token)
        position[i] = rows.start[i]
    timed = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        masks(matchers)
        timed += time.perf_counter() - started
        for i in range(BATCH):
            doc = rows.docs[i]
            if position[i] >= len(doc) or not advance(matchers[i], doc[position[i]]):
                matchers[i], position[i] = fresh(i), 0
            else:
                position[i] += 1
    return timed / steps


def timed_compile(compile_one: Callable[[dict[str, Any]], Any], entries: list[dict[str, Any]]) -> tuple[list, float]:
    """Compile every schema; the compiled ones (None for a failure) and the mean seconds per schema."""
    compiled, started = [], time.perf_counter()
    for entry in entries:
        try:
            compiled.append(compile_one(entry["schema"]))
        except Exception as error:  # a library that cannot take a schema is a finding, not a crash
            print(f"  could not compile {entry['name']}: {str(error).splitlines()[0][:120]}")
            compiled.append(None)
    return compiled, (time.perf_counter() - started) / len(entries)


def bench_llguidance(tokenizer, vocab: int, eos: int, rows: Rows, steps: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    compiler = ConstraintCompiler(tokenizer, vocab, frozenset({eos}), cache_size=0)  # no cache: time every compile
    compiler.compile(OutputConstraint(ConstraintKind.JSON_OBJECT))  # builds the tokenizer's trie once, untimed
    _, compile_s = timed_compile(
        lambda schema: compiler.compile(OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))),
        rows.schemas,
    )

    def fresh(i: int) -> RowConstraint:
        return compiler.compile(OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(rows.entries[i]["schema"])))

    def advance(row: RowConstraint, token: int) -> bool:
        row.advance(token)
        return row.error is None

    scores = torch.zeros(BATCH, vocab)
    bitmask = torch.empty(BATCH, (vocab + 31) // 32, dtype=torch.int32)

    def fill_only(matchers: list[RowConstraint]) -> None:
        for j, row in enumerate(matchers):
            row.fill_mask(bitmask[j])

    applied = measure_steps(rows, steps, fresh, lambda ms: apply_masks(scores, list(enumerate(ms))), advance)
    filled = measure_steps(rows, steps, fresh, fill_only, advance)
    return [
        result("llguidance, as loraserve applies it", applied, compile_s),
        result("llguidance, masks only", filled, compile_s),
    ]


def bench_xgrammar(tokenizer, vocab: int, rows: Rows, steps: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar is not installed (make setup installs it); skipped")
        return []
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, compile_s = timed_compile(
        lambda schema: compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":")),
        rows.schemas,
    )
    bitmask = xgr.allocate_token_bitmask(BATCH, vocab)
    batch = xgr.BatchGrammarMatcher(max_threads=torch.get_num_threads())

    def fresh(i: int) -> Any:
        return xgr.GrammarMatcher(compiled[i % len(compiled)] or compiler.compile_builtin_json_grammar())

    def serial(matchers: list[Any]) -> None:
        for j, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, j)

    def advance(matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    return [
        result("xgrammar, row by row", measure_steps(rows, steps, fresh, serial, advance), compile_s),
        result(
            "xgrammar, batch matcher",
            measure_steps(rows, steps, fresh, lambda ms: batch.batch_fill_next_token_bitmask(ms, bitmask), advance),
            compile_s,
        ),
    ]


def bench_outlines(tokenizer, vocab: int, eos: int, rows: Rows, steps: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask
    except ImportError:
        print("outlines-core is not installed (make setup installs it); skipped")
        return []
    tokens: dict[str, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id != eos and token_id < vocab:
            tokens.setdefault(tokenizer.convert_tokens_to_string([text]), []).append(token_id)
    vocabulary = Vocabulary(eos, tokens)
    indices, compile_s = timed_compile(
        lambda schema: Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), vocabulary),
        rows.schemas,
    )
    fallback = next(index for index in indices if index is not None)
    bitmask = allocate_token_bitmask(vocab)

    def masks(guides: list[Any]) -> None:
        for guide in guides:
            fill_next_token_bitmask(guide, bitmask)

    def advance(guide: Any, token: int) -> bool:
        try:
            guide.advance(token)
        except ValueError:
            return False
        return True

    measured = measure_steps(rows, steps, lambda i: Guide(indices[i % len(indices)] or fallback), masks, advance)
    return [result("outlines-core, row by row", measured, compile_s)]


def result(name: str, step_seconds: float, compile_seconds: float) -> dict[str, Any]:
    return {
        "library": name,
        "mask_ms_per_step_batch_32": round(1000 * step_seconds, 3),
        "compile_ms_per_schema": round(1000 * compile_seconds, 2),
    }


def measure_libraries(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    eos = tokenizer.eos_token_id
    rows = Rows(tokenizer, load_corpus()[: args.schemas])
    print(f"token masks: {BATCH} rows, {args.mask_steps} steps, vocabulary {vocab} ...", flush=True)
    return (
        bench_llguidance(tokenizer, vocab, eos, rows, args.mask_steps)
        + bench_xgrammar(tokenizer, vocab, rows, args.mask_steps)
        + bench_outlines(tokenizer, vocab, eos, rows, args.mask_steps)
    )


def measure_engine(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    fresh = FreshPrompts(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
    constraint = pb.OutputConstraint(json_schema=json.dumps(LONG_SCHEMA))
    port = load.free_port()
    server = load.start_server(args, [], port)
    target = f"127.0.0.1:{port}"
    runs: dict[str, list[load.LevelResult]] = {"free": [], "json": []}
    mask_seconds = mask_steps = 0.0
    try:
        asyncio.run(load.drive(target, fresh.take(1), 1, 1, 4, [""], constraint))  # warm up, compile the schema
        with Client(target) as client:
            for repeat in range(args.repeats):
                for name, given in (("free", None), ("json", constraint)):
                    print(f"engine, {name}: {BATCH} streams (run {repeat + 1}/{args.repeats}) ...", flush=True)
                    before = client.model_info().stats
                    outcomes, seconds = asyncio.run(
                        load.drive(target, fresh.take(BATCH), BATCH, 1, args.new_tokens, [""], given)
                    )
                    after = client.model_info().stats
                    runs[name].append(load.summarize(f"server, {name}", BATCH, outcomes, seconds))
                    if given is not None:
                        mask_seconds += after["constraint_mask_seconds"] - before["constraint_mask_seconds"]
                        mask_steps += after["constraint_mask_steps"] - before["constraint_mask_steps"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    free = statistics.median(r.tokens_per_second for r in runs["free"])
    constrained = statistics.median(r.tokens_per_second for r in runs["json"])
    return {
        "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
        "free_tokens_per_second": free,
        "json_tokens_per_second": constrained,
        "json_vs_free": round(constrained / free, 3),
        "mask_ms_per_step": round(1000 * mask_seconds / max(mask_steps, 1), 3),
        "mask_steps": int(mask_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    load.add_server_options(parser)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="engine runs of each kind; the medians are compared")
    parser.add_argument("--mask-steps", type=int, default=64, help="batch mask steps per library")
    parser.add_argument(
        "--schemas", type=int, default=None, help="use the corpus's first N schemas (default: all); the rows cycle"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON")
    args = parser.parse_args()
    args.levels = [BATCH]  # load.start_server sizes the batch from it

    from loraserve.server.models.loading import resolve_model_folder

    folder, _ = resolve_model_folder(args.model, Path(args.model_cache).expanduser())
    info = machine() | {"model": args.model, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"{info['cpu']} ({info['cpu_cores']} cores; {info['cpu_flags']})")
    libraries = measure_libraries(args, folder)
    engine = measure_engine(args, folder)
    print(f"\n{'library':40} {'mask ms/step (32 rows)':>24} {'compile ms/schema':>18}")
    for row in libraries:
        print(f"{row['library']:40} {row['mask_ms_per_step_batch_32']:>24} {row['compile_ms_per_schema']:>18}")
    print(
        f"\nengine, {BATCH} streams x {args.new_tokens} tokens: JSON-constrained {engine['json_tokens_per_second']} "
        f"tok/s vs free {engine['free_tokens_per_second']} tok/s = {engine['json_vs_free']}x; "
        f"mask cost {engine['mask_ms_per_step']} ms per step"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "structured-cpu.json"
    out.write_text(json.dumps({"machine": info, "libraries": libraries, "engine": engine}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
