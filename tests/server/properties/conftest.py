"""The property tests' server (one per test file in this folder) and the log of its unexpected errors.

Property-based tests of valid requests: messages that parse and fit the contract's shape but carry edge values in
every field (subnormal and largest floats, NaN, the limits of each integer type, strings at and past the server's
published limits, every constraint kind with tricky and empty languages, odd conversations, adapters that do not
load), sent to every RPC with a short deadline, a long one and none at all, and to the OpenAI-compatible HTTP API.
tests/server/test_fuzz.py sends malformed bytes; these requests reach the tokenizer, the constraint compiler, the
sampler and the adapter loader. Whatever comes in, the call ends OK or with a status the contract documents for that
RPC (never UNKNOWN or INTERNAL), the server logs no unexpected error, an OK generation has a stop reason, a constrained
output is in (or, cut off, a prefix of) its language, and health stays SERVING. strategies.py makes the requests,
checks.py holds the properties, and test_generation.py, test_services.py and test_http.py send them."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from safetensors.torch import load_file, save_file

from loraserve.config import CHARS_PER_CONTEXT_TOKEN, EngineConfig
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.server.properties.checks import restore_collections


@dataclasses.dataclass(frozen=True)
class Served:
    """The module's server, the limits it publishes in ModelInfo, and where its adapters and HTTP API are."""

    running: Any
    limits: pb.ServerLimits
    max_sequence_length: int
    vocab_size: int
    model_name: str
    root: Path
    http: str

    @property
    def max_input_chars(self) -> int:
        """The longest prompt: published in ModelInfo, or else the server's default for the context."""
        return getattr(self.limits, "max_input_chars", 0) or CHARS_PER_CONTEXT_TOKEN * self.max_sequence_length

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis shows it among a strategy's arguments
        printer.text("served")


def adapter_root(base: Path, adapter_dirs: dict[str, Path]) -> Path:
    """An adapter root with the test adapters and adapters that must not load, or must load and then serve."""
    root = base / "root"
    for name, folder in adapter_dirs.items():
        shutil.copytree(folder, root / name)
    config = json.loads((root / "alpha" / "adapter_config.json").read_text())
    weights = load_file(root / "alpha" / "adapter_model.safetensors")

    def variant(name: str, changes: dict[str, Any], scale: float = 1.0, extra: dict[str, str] | None = None) -> None:
        folder = root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config | changes))
        save_file(
            {k: v * scale if "lora_B" in k else v for k, v in weights.items()}, folder / "adapter_model.safetensors"
        )
        for file, text in (extra or {}).items():
            (folder / file).write_text(text)

    variant("alpha-huge", {"lora_alpha": 1e300})
    variant("weights-huge", {}, scale=3e38)
    variant("rank-huge", {"r": 2**63})
    variant("alpha-tiny", {"lora_alpha": 5e-324})
    variant("alpha-negative", {"lora_alpha": -3.4e38})
    variant("human-format", {}, extra={"loraserve.json": '{"prompt_format": "human-assistant"}'})
    variant("bogus-format", {}, extra={"loraserve.json": '{"prompt_format": "\\u0000"}'})
    variant("bad-pattern", {"alpha_pattern": {"(a+)+$": 2}})
    (root / "empty").mkdir()
    shutil.copytree(root / "alpha", root / "bad-json")
    (root / "bad-json" / "adapter_config.json").write_text("{")
    shutil.copytree(root / "beta", root / "wrong-rank")  # beta's config (r=8) with alpha's weights (r=4)
    shutil.copy(root / "alpha" / "adapter_model.safetensors", root / "wrong-rank" / "adapter_model.safetensors")
    shutil.copytree(root / "beta", root / "weights-broken")
    (root / "weights-broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return root


@pytest.fixture(scope="module")
def served(tiny_model_config, adapter_dirs, tmp_path_factory, free_port) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    """One server for the module, with small limits so that edge values reach them quickly."""
    from tests.conftest import RunningServer

    root = adapter_root(tmp_path_factory.mktemp("property-adapters"), adapter_dirs)
    engine = EngineConfig(
        max_new_tokens=16,
        default_max_new_tokens=8,
        max_batch_size=8,
        max_queued_requests=16,
        kv_cache_memory="64MB",
        max_adapters=4,
        max_stop_sequences=4,
        max_stop_sequence_length=32,
        max_top_n=5,
        max_constraint_bytes=2048,
        max_constraint_choices=64,
    )
    rag = {
        "max_rag_documents": 4,
        "max_upsert_documents": 4,
        "max_rag_document_chars": 2000,
        "max_rag_query_chars": 300,
        "rag_passage_chars": 200,  # three passages and the question fit the tiny model's context
        "rag_passage_overlap_chars": 50,
    }
    model_config = dataclasses.replace(tiny_model_config, adapter_root=str(root))
    running = RunningServer(model_config, engine, server_options={"http_port": free_port()}, rag_options=rag)
    with grpc.insecure_channel(running.target) as channel:
        info = pb_grpc.InferenceServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30)
        restore_collections(pb_grpc.CollectionServiceStub(channel))
    http = f"http://127.0.0.1:{running.server.http_port}"
    yield Served(running, info.limits, info.max_sequence_length, info.vocab_size, info.model_name, root, http)
    running.close()


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.running.target) as opened:
        yield opened


class ErrorLog(logging.Handler):
    """The server's ERROR and CRITICAL records (in this codebase, only unexpected failures are logged at ERROR)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(logging.Formatter().formatException(record.exc_info).splitlines(True)[-6:])
        self.records.append(text)

    def take(self) -> list[str]:
        records, self.records = self.records, []
        return records


@pytest.fixture(scope="module")
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)
