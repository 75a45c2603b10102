"""Protobuf <-> domain conversion. Pure functions: no engine, no I/O; the domain types validate themselves."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from loraserve.config import EngineConfig, RagConfig
from loraserve.errors import InvalidRequest
from loraserve.prompting import Message, validate_messages
from loraserve.server.engine.outputs import GenerationChunk, GenerationResult, StopReason, TokenDetail
from loraserve.server.engine.params import (
    ConstraintKind,
    GenerationRequest,
    OutputConstraint,
    OutputOptions,
    SamplingParams,
    StoppingParams,
)
from loraserve.server.engine.stats import EngineStats
from loraserve.server.models.adapters.spec import AdapterInfo
from loraserve.server.models.types import ModelDescription
from loraserve.server.retrieval.documents import Document, check_documents
from loraserve.server.retrieval.rag import DEFAULT_TOP_K, MAX_TOP_K, RagAnswer, RagQuery
from loraserve.server.retrieval.search import Hit
from loraserve.server.retrieval.store import CollectionInfo, UpsertOutcome
from loraserve.v1 import inference_pb2 as pb

_STOP_REASONS = {
    StopReason.MAX_TOKENS: pb.STOP_REASON_MAX_TOKENS,
    StopReason.EOS_TOKEN: pb.STOP_REASON_EOS_TOKEN,
    StopReason.STOP_SEQUENCE: pb.STOP_REASON_STOP_SEQUENCE,
    StopReason.TIME_LIMIT: pb.STOP_REASON_TIME_LIMIT,
    StopReason.CANCELLED: pb.STOP_REASON_CANCELLED,
    StopReason.TOKEN_LIMIT: pb.STOP_REASON_TOKEN_LIMIT,
    StopReason.CONSTRAINT_COMPLETE: pb.STOP_REASON_CONSTRAINT_COMPLETE,
}


class _GenerateLike(Protocol):
    """GenerateRequest and GenerateStreamRequest have the same fields."""

    prompt: str
    messages: Any
    adapter_id: str
    sampling: pb.SamplingParams
    stopping: pb.StoppingCriteria
    response: pb.ResponseOptions
    truncate_input_tokens: int
    constraint: pb.OutputConstraint

    def HasField(self, name: str) -> bool: ...


def _optional(message: Any, name: str, default: Any) -> Any:
    """A proto3 `optional` field's value, or default when it is unset."""
    return getattr(message, name) if message.HasField(name) else default


def messages(items: Iterable[pb.Message]) -> tuple[Message, ...]:
    return tuple(Message(role=m.role, content=m.content) for m in items)


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=_optional(message, "temperature", 0.0),
        top_k=_optional(message, "top_k", 0),
        top_p=_optional(message, "top_p", 1.0),
        seed=_optional(message, "seed", None),
        repetition_penalty=_optional(message, "repetition_penalty", 1.0),
    )


def stopping_params(message: pb.StoppingCriteria) -> StoppingParams:
    return StoppingParams(
        max_new_tokens=_optional(message, "max_new_tokens", None),
        min_new_tokens=_optional(message, "min_new_tokens", 0),
        stop_sequences=tuple(message.stop_sequences),
        include_stop_sequence=_optional(message, "include_stop_sequence", False),
        time_limit_ms=_optional(message, "time_limit_ms", None),
    )


def output_options(message: pb.ResponseOptions) -> OutputOptions:
    return OutputOptions(
        token_ids=_optional(message, "token_ids", False),
        logprobs=_optional(message, "logprobs", False),
        top_n=_optional(message, "top_n", 0),
        input_tokens=_optional(message, "input_tokens", False),
    )


def output_constraint(message: Any) -> OutputConstraint | None:
    """The request's `constraint` field (GenerateRequest, GenerateStreamRequest or RagQueryRequest), None if unset."""
    if not message.HasField("constraint"):
        return None
    constraint: pb.OutputConstraint = message.constraint
    which = constraint.WhichOneof("kind")
    if which is None:
        raise InvalidRequest(
            "set one of json_schema, json_object, regex, choice and grammar (or leave constraint unset)", "constraint"
        )
    kind = ConstraintKind(which)
    if kind is ConstraintKind.JSON_OBJECT and not constraint.json_object:
        raise InvalidRequest("must be true (any JSON object); leave the constraint unset for free text", "constraint")
    if kind is ConstraintKind.CHOICE:
        return OutputConstraint(kind, choices=tuple(constraint.choice.values))
    return OutputConstraint(kind, text="" if kind is ConstraintKind.JSON_OBJECT else getattr(constraint, which))


def generation_request(message: _GenerateLike, request_id: str, deadline: float | None) -> GenerationRequest:
    """A GenerateRequest or GenerateStreamRequest as the engine's request."""
    return GenerationRequest(
        prompt=message.prompt,
        messages=messages(message.messages),
        adapter_id=message.adapter_id,
        sampling=sampling_params(message.sampling),
        stopping=stopping_params(message.stopping),
        output=output_options(message.response),
        truncate_input_tokens=_optional(message, "truncate_input_tokens", 0),
        constraint=output_constraint(message),
        request_id=request_id,
        deadline=deadline,
    )


def documents(items: Iterable[pb.Document]) -> tuple[Document, ...]:
    return tuple(Document(id=d.id, text=d.text, title=d.title, metadata=dict(d.metadata)) for d in items)


def rag_query(message: pb.RagQueryRequest, request_id: str, deadline: float | None, config: RagConfig) -> RagQuery:
    if len(message.query) > config.max_rag_query_chars:
        raise InvalidRequest(
            f"has {len(message.query)} characters; at most {config.max_rag_query_chars} are allowed", "query"
        )
    inline = documents(message.documents)
    check_documents(
        inline, config.max_rag_documents, config.max_rag_document_chars, "documents", config.max_request_document_chars
    )
    return RagQuery(
        query=message.query,
        documents=inline,
        collection=message.collection,
        min_similarity=_optional(message, "min_similarity", None),
        top_k=_optional(message, "top_k", DEFAULT_TOP_K),
        adapter_id=message.adapter_id,
        sampling=sampling_params(message.sampling),
        stopping=stopping_params(message.stopping),
        constraint=output_constraint(message),
        request_id=request_id,
        deadline=deadline,
    )


def tokenize_request(message: pb.TokenizeRequest) -> tuple[str, tuple[Message, ...], bool]:
    """(text, messages, return_tokens), with exactly one of text and messages."""
    chat = messages(message.messages)
    if message.text and chat:
        raise InvalidRequest("give exactly one of text and messages, not both", "text")
    if not message.text and not chat:
        raise InvalidRequest("must not be empty (or give messages instead)", "text")
    if chat:
        validate_messages(chat)
    return message.text, chat, _optional(message, "return_tokens", False)


def stop_reason(reason: StopReason | None) -> pb.StopReason.ValueType:
    return _STOP_REASONS[reason] if reason is not None else pb.STOP_REASON_UNSPECIFIED


def token_info(detail: TokenDetail) -> pb.TokenInfo:
    info = pb.TokenInfo(id=detail.id, text=detail.text)
    if detail.logprob is not None:
        info.logprob = detail.logprob
    info.top_tokens.extend(pb.TopToken(id=t.id, text=t.text, logprob=t.logprob) for t in detail.top_tokens)
    return info


def _generation_fields(item: GenerationResult | GenerationChunk) -> dict[str, Any]:
    """The fields GenerateResponse and GenerateStreamResponse share, from a result or a chunk."""
    fields: dict[str, Any] = dict(
        text=item.text,
        stop_reason=stop_reason(item.stop_reason),
        input_token_count=item.input_token_count,
        cached_input_token_count=item.cached_input_token_count,
        generated_token_count=item.generated_token_count,
        request_id=item.request_id,
        stop_sequence=item.stop_sequence,
        tokens=[token_info(t) for t in item.tokens],
        input_tokens=[token_info(t) for t in item.input_tokens],
    )
    if item.seed is not None:
        fields["seed"] = item.seed
    return fields


def generate_response(result: GenerationResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(**_generation_fields(result))


def stream_response(chunk: GenerationChunk) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(**_generation_fields(chunk))


def source(rank: int, cited: bool, hit: Hit) -> pb.Source:
    passage = hit.passage
    message = pb.Source(
        document_id=passage.document_id,
        title=passage.title,
        passage=passage.text,
        score=hit.score,
        rank=rank,
        metadata=passage.metadata,
        cited=cited,
        similarity=hit.similarity,
        collection=hit.collection,
        passage_index=passage.index,
        start_char=passage.start,
        end_char=passage.end,
    )
    if hit.bm25 is not None:
        message.bm25_score = hit.bm25
    return message


def rag_response(answer: RagAnswer) -> pb.RagQueryResponse:
    response = pb.RagQueryResponse(
        text=answer.text,
        request_id=answer.request_id,
        sources=[source(s.rank, s.cited, s.hit) for s in answer.sources],
    )
    result = answer.result
    if result is not None:
        response.stop_reason = stop_reason(result.stop_reason)
        response.input_token_count = result.input_token_count
        response.generated_token_count = result.generated_token_count
        if result.seed is not None:
            response.seed = result.seed
    return response


def server_limits(config: EngineConfig, rag: RagConfig, max_input_chars: int) -> pb.ServerLimits:
    return pb.ServerLimits(
        max_new_tokens=config.max_new_tokens,
        default_max_new_tokens=config.default_max_new_tokens,
        max_stop_sequences=config.max_stop_sequences,
        max_stop_sequence_length=config.max_stop_sequence_length,
        max_batch_size=config.max_batch_size,
        max_queued_requests=config.max_queued_requests,
        max_top_n=config.max_top_n,
        max_rag_documents=rag.max_rag_documents,
        max_prefill_tokens=config.max_prefill_tokens,
        max_rag_document_chars=rag.max_rag_document_chars,
        max_rag_query_chars=rag.max_rag_query_chars,
        max_upsert_documents=rag.max_upsert_documents,
        max_rag_top_k=MAX_TOP_K,
        max_constraint_bytes=config.max_constraint_bytes,
        max_constraint_choices=config.max_constraint_choices,
        max_input_chars=max_input_chars,
        max_request_document_chars=rag.max_request_document_chars,
    )


def tokenize_response(count: int, details: tuple[TokenDetail, ...]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_count=count, tokens=[token_info(t) for t in details])


def adapter_info(adapter: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        id=adapter.id,
        rank=adapter.rank,
        alpha=adapter.alpha,
        target_modules=list(adapter.target_modules),
        source=adapter.source,
        prompt_format=adapter.prompt_format,
        active_requests=adapter.active_requests,
        version=adapter.version,
    )


def model_info_response(
    description: ModelDescription,
    adapters: list[AdapterInfo],
    config: EngineConfig,
    rag: RagConfig,
    stats: EngineStats,
    prompt_format: str,
    version: str,
    embedding_model: str,
    max_input_chars: int,
) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model_name=description.name,
        model_source=description.source,
        architecture=description.architecture,
        dtype=description.dtype,
        device=description.device,
        quantization=description.quantization,
        max_sequence_length=description.max_sequence_length,
        vocab_size=description.vocab_size,
        adapters=[adapter_info(a) for a in adapters],
        server_version=version,
        limits=server_limits(config, rag, max_input_chars),
        stats=pb.ServerStats(**asdict(stats), prefix_cache_hit_rate=stats.prefix_cache_hit_rate),
        prompt_format=prompt_format,
        embedding_model=embedding_model,
    )


def upsert_documents(message: pb.UpsertDocumentsRequest, config: RagConfig) -> tuple[Document, ...]:
    items = documents(message.documents)
    if not items:
        raise InvalidRequest("must contain at least one document", "documents")
    check_documents(
        items,
        config.max_upsert_documents,
        config.max_rag_document_chars,
        "documents",
        config.max_request_document_chars,
    )
    return items


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def collection_info(info: CollectionInfo) -> pb.CollectionInfo:
    return pb.CollectionInfo(
        name=info.name,
        document_count=info.documents,
        passage_count=info.passages,
        embedding_model=info.embedding_model,
        compatible=info.compatible,
        size_bytes=info.size_bytes,
        create_time=_timestamp(info.created),
        update_time=_timestamp(info.updated),
    )


def upsert_response(outcome: UpsertOutcome, info: CollectionInfo) -> pb.UpsertDocumentsResponse:
    return pb.UpsertDocumentsResponse(
        collection=collection_info(info),
        upserted_documents=outcome.documents,
        passages=outcome.passages,
        embedded_passages=outcome.embedded,
    )
