"""The client's typed results, built from the contract's messages, and the request builders both clients share."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict

import grpc

from loraserve.v1 import inference_pb2 as pb


class StopReason(enum.StrEnum):
    """Why generation ended (the contract's StopReason without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    MAX_TOKENS = "MAX_TOKENS"
    EOS_TOKEN = "EOS_TOKEN"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    TIME_LIMIT = "TIME_LIMIT"
    CANCELLED = "CANCELLED"
    TOKEN_LIMIT = "TOKEN_LIMIT"
    CONSTRAINT_COMPLETE = "CONSTRAINT_COMPLETE"

    @classmethod
    def from_proto(cls, value: int) -> StopReason:
        return cls(pb.StopReason.Name(value).removeprefix("STOP_REASON_"))  # type: ignore[arg-type]


class LoraserveRpcError(Exception):
    """A call failed; `code` is the gRPC status (e.g. INVALID_ARGUMENT) and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id

    @classmethod
    def from_grpc(cls, error: grpc.RpcError) -> LoraserveRpcError:
        metadata = dict(error.initial_metadata() or ()) if hasattr(error, "initial_metadata") else {}
        return cls(error.code(), error.details() or "", metadata.get("x-request-id"))


class GenerationOptions(TypedDict, total=False):
    """Keyword options of generate, stream and rag_query; each maps to one request field of the contract."""

    adapter_id: str
    # sampling
    temperature: float
    top_k: int
    top_p: float
    seed: int
    repetition_penalty: float
    # stopping
    max_new_tokens: int
    min_new_tokens: int
    stop_sequences: Sequence[str]
    include_stop_sequence: bool
    time_limit_ms: int
    # response details (not for rag_query)
    token_ids: bool
    logprobs: bool
    top_n: int
    input_tokens: bool
    truncate_input_tokens: int
    # output constraint: at most one (a JSON schema may be given as a mapping or as JSON text)
    json_schema: Mapping[str, Any] | str
    json_object: bool
    regex: str
    choice: Sequence[str]
    grammar: str


_SAMPLING = ("temperature", "top_k", "top_p", "seed", "repetition_penalty")
_STOPPING = ("max_new_tokens", "min_new_tokens", "include_stop_sequence", "time_limit_ms")
_RESPONSE = ("token_ids", "logprobs", "top_n", "input_tokens")
_CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")


def build_constraint(options: Mapping[str, Any]) -> pb.OutputConstraint | None:
    """The OutputConstraint the options ask for, or None; more than one is a TypeError."""
    given = [name for name in _CONSTRAINTS if options.get(name) not in (None, False)]
    if len(given) > 1:
        raise TypeError(f"give at most one output constraint, got {', '.join(given)}")
    if not given:
        return None
    name, value = given[0], options[given[0]]
    if name == "json_schema":
        return pb.OutputConstraint(json_schema=value if isinstance(value, str) else json.dumps(value))
    if name == "choice":
        if isinstance(value, str):
            raise TypeError("choice takes a sequence of strings, not one string")
        return pb.OutputConstraint(choice=pb.Choices(values=list(value)))
    return pb.OutputConstraint(**{name: value})


def _fill(message: Any, options: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if options.get(name) is not None:
            setattr(message, name, options[name])


def _messages(items: Sequence[Mapping[str, str]] | None) -> list[pb.Message]:
    return [pb.Message(role=m["role"], content=m["content"]) for m in items or ()]


def build_generation(
    request: Any, prompt: str | None, messages: Sequence[Mapping[str, str]] | None, options: GenerationOptions
) -> Any:
    """Fill a GenerateRequest or GenerateStreamRequest from a prompt or messages and keyword options."""
    unknown = set(options) - GenerationOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    request.prompt = prompt or ""
    request.messages.extend(_messages(messages))
    request.adapter_id = options.get("adapter_id", "")
    _fill(request.sampling, options, _SAMPLING)
    _fill(request.stopping, options, _STOPPING)
    request.stopping.stop_sequences.extend(options.get("stop_sequences", ()))
    _fill(request.response, options, _RESPONSE)
    if options.get("truncate_input_tokens") is not None:
        request.truncate_input_tokens = options["truncate_input_tokens"]
    constraint = build_constraint(options)
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    return request


def build_documents(documents: Sequence[Mapping[str, Any]]) -> list[pb.Document]:
    """Documents given as {"id", "text", "title"?, "metadata"?} mappings."""
    return [
        pb.Document(id=d["id"], text=d["text"], title=d.get("title", ""), metadata=d.get("metadata", {}))
        for d in documents
    ]


def build_rag_query(
    query: str,
    documents: Sequence[Mapping[str, Any]],
    collection: str,
    top_k: int | None,
    min_similarity: float | None,
    options: GenerationOptions,
) -> pb.RagQueryRequest:
    not_for_rag = set(options) - {"adapter_id", *_SAMPLING, *_STOPPING, "stop_sequences", *_CONSTRAINTS}
    if not_for_rag:
        raise TypeError(f"option(s) not available for rag_query: {', '.join(sorted(not_for_rag))}")
    request = pb.RagQueryRequest(
        query=query,
        adapter_id=options.get("adapter_id", ""),
        documents=build_documents(documents),
        collection=collection,
    )
    if top_k is not None:
        request.top_k = top_k
    if min_similarity is not None:
        request.min_similarity = min_similarity
    _fill(request.sampling, options, _SAMPLING)
    _fill(request.stopping, options, _STOPPING)
    request.stopping.stop_sequences.extend(options.get("stop_sequences", ()))
    constraint = build_constraint(options)
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    return request


def build_tokenize(
    text: str | None, messages: Sequence[Mapping[str, str]] | None, return_tokens: bool
) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(text=text or "", messages=_messages(messages), return_tokens=return_tokens)


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Token:
    """A prompt or generated token; logprob and top_tokens only when they were asked for."""

    id: int
    text: str
    logprob: float | None = None
    top_tokens: tuple[TopToken, ...] = ()

    @classmethod
    def from_proto(cls, info: pb.TokenInfo) -> Token:
        return cls(
            id=info.id,
            text=info.text,
            logprob=info.logprob if info.HasField("logprob") else None,
            top_tokens=tuple(TopToken(t.id, t.text, t.logprob) for t in info.top_tokens),
        )


def _tokens(infos: Sequence[pb.TokenInfo]) -> tuple[Token, ...]:
    return tuple(Token.from_proto(i) for i in infos)


def _generation_fields(r: pb.GenerateResponse | pb.GenerateStreamResponse) -> dict[str, Any]:
    """The fields Generation and StreamChunk share."""
    return dict(
        text=r.text,
        stop_reason=StopReason.from_proto(r.stop_reason),
        input_token_count=r.input_token_count,
        generated_token_count=r.generated_token_count,
        request_id=r.request_id,
        seed=r.seed if r.HasField("seed") else None,
        stop_sequence=r.stop_sequence,
        cached_input_token_count=r.cached_input_token_count,
        tokens=_tokens(r.tokens),
        input_tokens=_tokens(r.input_tokens),
    )


@dataclass(frozen=True)
class Generation:
    """A whole completion (from generate)."""

    text: str
    stop_reason: StopReason
    input_token_count: int
    generated_token_count: int
    request_id: str
    seed: int | None = None
    stop_sequence: str = ""
    tokens: tuple[Token, ...] = ()
    input_tokens: tuple[Token, ...] = ()
    cached_input_token_count: int = 0  # prompt tokens served from the server's prefix cache

    @classmethod
    def from_proto(cls, r: pb.GenerateResponse) -> Generation:
        return cls(**_generation_fields(r))


@dataclass(frozen=True)
class StreamChunk:
    """One streamed step: the new text, the counts so far, and on the last chunk the stop reason."""

    text: str
    input_token_count: int
    generated_token_count: int
    request_id: str
    stop_reason: StopReason | None = None
    seed: int | None = None
    stop_sequence: str = ""
    tokens: tuple[Token, ...] = ()
    input_tokens: tuple[Token, ...] = ()
    cached_input_token_count: int = 0  # prompt tokens served from the server's prefix cache

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    @classmethod
    def from_proto(cls, r: pb.GenerateStreamResponse) -> StreamChunk:
        fields = _generation_fields(r)
        return cls(**fields | {"stop_reason": fields["stop_reason"] if r.stop_reason else None})


@dataclass(frozen=True)
class Source:
    """A passage the answer was given; the answer cites it as [rank] when `cited`."""

    document_id: str
    title: str
    passage: str
    score: float
    rank: int
    metadata: dict[str, str] = field(default_factory=dict)
    cited: bool = False
    similarity: float = 0.0
    bm25_score: float | None = None
    collection: str = ""
    passage_index: int = 0
    start_char: int = 0
    end_char: int = 0

    @classmethod
    def from_proto(cls, s: pb.Source) -> Source:
        return cls(
            document_id=s.document_id,
            title=s.title,
            passage=s.passage,
            score=s.score,
            rank=s.rank,
            metadata=dict(s.metadata),
            cited=s.cited,
            similarity=s.similarity,
            bm25_score=s.bm25_score if s.HasField("bm25_score") else None,
            collection=s.collection,
            passage_index=s.passage_index,
            start_char=s.start_char,
            end_char=s.end_char,
        )


@dataclass(frozen=True)
class RagAnswer:
    text: str
    sources: tuple[Source, ...]
    stop_reason: StopReason
    input_token_count: int
    generated_token_count: int
    request_id: str
    seed: int | None = None

    @classmethod
    def from_proto(cls, r: pb.RagQueryResponse) -> RagAnswer:
        return cls(
            text=r.text,
            sources=tuple(Source.from_proto(s) for s in r.sources),
            stop_reason=StopReason.from_proto(r.stop_reason),
            input_token_count=r.input_token_count,
            generated_token_count=r.generated_token_count,
            request_id=r.request_id,
            seed=r.seed if r.HasField("seed") else None,
        )


@dataclass(frozen=True)
class Tokenization:
    token_count: int
    tokens: tuple[Token, ...] = ()

    @classmethod
    def from_proto(cls, r: pb.TokenizeResponse) -> Tokenization:
        return cls(token_count=r.token_count, tokens=_tokens(r.tokens))


@dataclass(frozen=True)
class AdapterInfo:
    """A resident adapter, with every field the server reports."""

    id: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    source: str
    prompt_format: str = ""
    active_requests: int = 0
    version: str = ""

    @classmethod
    def from_proto(cls, a: pb.AdapterInfo) -> AdapterInfo:
        return cls(
            id=a.id,
            rank=a.rank,
            alpha=a.alpha,
            target_modules=tuple(a.target_modules),
            source=a.source,
            prompt_format=a.prompt_format,
            active_requests=a.active_requests,
            version=a.version,
        )


@dataclass(frozen=True)
class AdapterLoad:
    """What LoadAdapter did: the adapter now resident, and the idle adapters it unloaded to make room."""

    adapter: AdapterInfo
    evicted: tuple[str, ...]

    @classmethod
    def from_proto(cls, r: pb.LoadAdapterResponse) -> AdapterLoad:
        return cls(adapter=AdapterInfo.from_proto(r.adapter), evicted=tuple(r.evicted))


@dataclass(frozen=True)
class AdapterList:
    """The resident adapters and how many may be resident at once."""

    adapters: tuple[AdapterInfo, ...]
    max_adapters: int

    @classmethod
    def from_proto(cls, r: pb.ListAdaptersResponse) -> AdapterList:
        return cls(adapters=tuple(AdapterInfo.from_proto(a) for a in r.adapters), max_adapters=r.max_adapters)


@dataclass(frozen=True)
class ModelInfo:
    """What the server serves; `limits` and `stats` are the contract's ServerLimits and ServerStats as dicts."""

    model_name: str
    model_source: str
    architecture: str
    dtype: str
    device: str
    quantization: str
    max_sequence_length: int
    vocab_size: int
    adapters: tuple[AdapterInfo, ...]
    server_version: str
    prompt_format: str
    limits: dict[str, int]
    stats: dict[str, float]

    @classmethod
    def from_proto(cls, r: pb.ModelInfoResponse) -> ModelInfo:
        return cls(
            model_name=r.model_name,
            model_source=r.model_source,
            architecture=r.architecture,
            dtype=r.dtype,
            device=r.device,
            quantization=r.quantization,
            max_sequence_length=r.max_sequence_length,
            vocab_size=r.vocab_size,
            adapters=tuple(AdapterInfo.from_proto(a) for a in r.adapters),
            server_version=r.server_version,
            prompt_format=r.prompt_format,
            limits={f.name: getattr(r.limits, f.name) for f in r.limits.DESCRIPTOR.fields},
            stats={f.name: getattr(r.stats, f.name) for f in r.stats.DESCRIPTOR.fields},
        )


@dataclass(frozen=True)
class CollectionInfo:
    """A stored collection; `compatible` is False when the server now embeds with another model."""

    name: str
    document_count: int
    passage_count: int
    embedding_model: str
    compatible: bool
    size_bytes: int
    create_time: datetime
    update_time: datetime

    @classmethod
    def from_proto(cls, c: pb.CollectionInfo) -> CollectionInfo:
        return cls(
            name=c.name,
            document_count=c.document_count,
            passage_count=c.passage_count,
            embedding_model=c.embedding_model,
            compatible=c.compatible,
            size_bytes=c.size_bytes,
            create_time=c.create_time.ToDatetime(tzinfo=UTC),
            update_time=c.update_time.ToDatetime(tzinfo=UTC),
        )


@dataclass(frozen=True)
class UpsertResult:
    collection: CollectionInfo
    upserted_documents: int
    passages: int
    embedded_passages: int  # the rest reused the embedding of an unchanged passage

    @classmethod
    def from_proto(cls, r: pb.UpsertDocumentsResponse) -> UpsertResult:
        return cls(CollectionInfo.from_proto(r.collection), r.upserted_documents, r.passages, r.embedded_passages)


@dataclass(frozen=True)
class DeleteResult:
    collection: CollectionInfo
    deleted_documents: int
    not_found: tuple[str, ...]

    @classmethod
    def from_proto(cls, r: pb.DeleteDocumentsResponse) -> DeleteResult:
        return cls(CollectionInfo.from_proto(r.collection), r.deleted_documents, tuple(r.not_found))
