"""Proto <-> domain conversion, tested without an engine."""

from __future__ import annotations

import numpy as np
import pytest

from loraserve.config import EngineConfig, RagConfig
from loraserve.errors import InvalidRequest
from loraserve.prompting import Message
from loraserve.server import convert
from loraserve.server.engine.outputs import GenerationChunk, GenerationResult, StopReason, TokenDetail, TopToken
from loraserve.server.models.adapters.spec import AdapterInfo
from loraserve.server.retrieval.rag import RagAnswer, Source
from loraserve.server.retrieval.search import Hit
from loraserve.server.retrieval.store import StoredPassage
from loraserve.v1 import inference_pb2 as pb


def test_unset_optionals_take_defaults_and_set_zeros_are_kept() -> None:
    unset = convert.generation_request(pb.GenerateRequest(prompt="x"), "rid", None)
    assert unset.sampling.temperature == 0 and unset.sampling.top_p == 1.0 and unset.sampling.seed is None
    assert unset.stopping.max_new_tokens is None
    explicit = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(seed=0, temperature=0.5))
    request = convert.generation_request(explicit, "rid", 12.5)
    assert request.sampling.seed == 0
    assert request.sampling.temperature == pytest.approx(0.5)
    assert request.request_id == "rid" and request.deadline == 12.5


def test_zero_max_new_tokens_is_an_error_not_a_default() -> None:
    message = pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(max_new_tokens=0))
    with pytest.raises(InvalidRequest, match=r"stopping\.max_new_tokens"):
        convert.generation_request(message, "rid", None)


def test_stream_requests_convert_like_unary_ones() -> None:
    fields = dict(
        messages=[pb.Message(role="user", content="hi")],
        adapter_id="alpha",
        sampling=pb.SamplingParams(temperature=0.9, top_k=5, top_p=0.5, seed=7, repetition_penalty=1.2),
        stopping=pb.StoppingCriteria(
            max_new_tokens=9, min_new_tokens=2, stop_sequences=["\n"], time_limit_ms=50, include_stop_sequence=True
        ),
        response=pb.ResponseOptions(token_ids=True, logprobs=True, top_n=3, input_tokens=True),
        truncate_input_tokens=11,
    )
    unary = convert.generation_request(pb.GenerateRequest(**fields), "r", None)
    streamed = convert.generation_request(pb.GenerateStreamRequest(**fields), "r", None)
    assert unary == streamed
    assert unary.messages == (Message("user", "hi"),)
    assert unary.stopping.stop_sequences == ("\n",) and unary.stopping.include_stop_sequence
    assert unary.output.top_n == 3 and unary.truncate_input_tokens == 11


def test_results_convert_with_details_and_seed_only_when_sampling() -> None:
    detail = TokenDetail(id=5, text="a", logprob=-0.5, top_tokens=(TopToken(5, "a", -0.5),))
    result = GenerationResult("rid", "text", StopReason.STOP_SEQUENCE, 3, 4, (detail,), seed=None, stop_sequence=".")
    response = convert.generate_response(result)
    assert response.stop_reason == pb.STOP_REASON_STOP_SEQUENCE
    assert not response.HasField("seed")
    assert response.tokens[0].logprob == pytest.approx(-0.5) and response.tokens[0].top_tokens[0].id == 5
    chunk = GenerationChunk("rid", "t", 3, 1, seed=0)
    streamed = convert.stream_response(chunk)
    assert streamed.HasField("seed") and streamed.seed == 0
    assert streamed.stop_reason == pb.STOP_REASON_UNSPECIFIED


def test_every_stop_reason_has_a_proto_value() -> None:
    values = {convert.stop_reason(reason) for reason in StopReason}
    assert len(values) == len(StopReason) and pb.STOP_REASON_UNSPECIFIED not in values


def test_rag_query_enforces_the_limits_and_keeps_unset_optionals() -> None:
    message = pb.RagQueryRequest(query="q", documents=[pb.Document(id=str(i), text="t") for i in range(3)])
    with pytest.raises(InvalidRequest, match="at most 2 documents"):
        convert.rag_query(message, "rid", None, RagConfig(max_rag_documents=2))
    with pytest.raises(InvalidRequest, match="query: has 2 characters; at most 1 are allowed"):
        convert.rag_query(pb.RagQueryRequest(query="qq", collection="c"), "rid", None, RagConfig(max_rag_query_chars=1))
    query = convert.rag_query(message, "rid", None, RagConfig(max_rag_documents=3))
    assert query.top_k == 3 and [d.id for d in query.documents] == ["0", "1", "2"]
    assert query.min_similarity is None and query.collection == ""
    message.min_similarity, message.collection = 0.0, "kb"
    query = convert.rag_query(message, "rid", None, RagConfig())
    assert query.min_similarity == 0.0 and query.collection == "kb"


def test_rag_response_without_sources_has_no_generation_fields() -> None:
    empty = convert.rag_response(RagAnswer("rid", "No relevant documents", (), None))
    assert not empty.sources and empty.stop_reason == pb.STOP_REASON_UNSPECIFIED
    passage = StoredPassage(7, "d1", "Title", {"k": "v"}, 2, "body", 10, 14)
    keyword = Source(Hit("kb", passage, 0.9, 0.75, 3.5, np.zeros(4)), 1, True)
    dense = Source(Hit("", passage, 0.4, 0.5, None, np.zeros(4)), 2, False)
    result = GenerationResult("rid", "ans", StopReason.EOS_TOKEN, 10, 2)
    full = convert.rag_response(RagAnswer("rid", "ans", (keyword, dense), result))
    first, second = full.sources
    assert (first.document_id, first.title, first.passage, dict(first.metadata)) == ("d1", "Title", "body", {"k": "v"})
    assert (first.collection, first.passage_index, first.start_char, first.end_char) == ("kb", 2, 10, 14)
    assert (first.rank, first.cited, first.score, first.similarity, first.bm25_score) == (1, True, 0.9, 0.75, 3.5)
    assert not second.HasField("bm25_score") and not second.cited and second.collection == ""
    assert full.generated_token_count == 2 and full.stop_reason == pb.STOP_REASON_EOS_TOKEN


def test_tokenize_request_needs_exactly_one_input() -> None:
    with pytest.raises(InvalidRequest, match="text"):
        convert.tokenize_request(pb.TokenizeRequest())
    with pytest.raises(InvalidRequest, match="not both"):
        convert.tokenize_request(pb.TokenizeRequest(text="a", messages=[pb.Message(role="user", content="b")]))
    with pytest.raises(InvalidRequest, match=r"messages\[0\].role"):
        convert.tokenize_request(pb.TokenizeRequest(messages=[pb.Message(role="x", content="b")]))
    assert convert.tokenize_request(pb.TokenizeRequest(text="a", return_tokens=True)) == ("a", (), True)


def test_server_limits_mirror_the_engine_config() -> None:
    limits = convert.server_limits(
        EngineConfig(max_batch_size=3, max_top_n=4), RagConfig(max_upsert_documents=5), max_input_chars=6
    )
    assert limits.max_batch_size == 3 and limits.max_top_n == 4
    assert limits.max_upsert_documents == 5 and limits.max_rag_documents == RagConfig().max_rag_documents


def test_model_info_response_carries_description_adapters_limits_and_stats() -> None:
    from loraserve.server.engine.stats import EngineStats
    from loraserve.server.models.types import ModelDescription

    description = ModelDescription("m", "default", "LlamaForCausalLM", "float32", "cpu", "none", 8192, 49152)
    adapters = [AdapterInfo("alpha", 4, 16.0, ("q_proj", "v_proj"), "/adapters/alpha")]
    stats = EngineStats(
        active_requests=2,
        queued_requests=1,
        generated_tokens=99,
        completed_requests=5,
        uptime_seconds=3.5,
        kv_cache_tokens=1024,
        kv_cache_used_tokens=256,
        kv_cache_blocks=64,
        kv_cache_block_size=16,
        kv_cache_used_blocks=16,
        kv_cache_cached_blocks=5,
        prefix_caching=True,
        prefix_cache_queried_tokens=400,
        prefix_cache_hit_tokens=100,
        preemptions=3,
    )
    info = convert.model_info_response(
        description, adapters, EngineConfig(), RagConfig(), stats, "chat-template", "1.2.3", "all-MiniLM-L6-v2", 9000
    )
    assert (info.model_name, info.max_sequence_length, info.vocab_size) == ("m", 8192, 49152)
    assert info.adapters[0].id == "alpha" and list(info.adapters[0].target_modules) == ["q_proj", "v_proj"]
    assert info.stats.active_requests == 2 and info.stats.generated_tokens == 99
    assert info.stats.kv_cache_tokens == 1024 and info.stats.kv_cache_used_tokens == 256
    assert (info.stats.kv_cache_blocks, info.stats.kv_cache_block_size, info.stats.kv_cache_used_blocks) == (64, 16, 16)
    assert info.stats.kv_cache_cached_blocks == 5 and info.stats.prefix_caching and info.stats.preemptions == 3
    assert info.stats.prefix_cache_hit_tokens == 100 and info.stats.prefix_cache_hit_rate == 0.25
    assert info.limits.max_new_tokens == EngineConfig().max_new_tokens and info.limits.max_input_chars == 9000
    assert info.limits.max_request_document_chars == RagConfig().max_request_document_chars
    assert info.server_version == "1.2.3" and info.prompt_format == "chat-template"
    assert info.embedding_model == "all-MiniLM-L6-v2"
