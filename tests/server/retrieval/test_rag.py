"""RagQuery's answer: the prompt numbers the relevant passages, the answer's citations name real sources, and when
nothing is relevant the server says so without generating."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from loraserve.client import LoraserveRpcError
from loraserve.config import RagConfig
from loraserve.errors import InvalidRequest
from loraserve.server.engine.outputs import GenerationResult, StopReason
from loraserve.server.engine.params import GenerationRequest
from loraserve.server.engine.preparation import PromptTooLong
from loraserve.server.retrieval.documents import Document
from loraserve.server.retrieval.rag import NO_RELEVANT_DOCUMENTS, SYSTEM_PROMPT, RagQuery, answer, answer_messages
from loraserve.server.retrieval.retriever import Retriever
from tests.conftest import wait_for

DOCUMENTS = (
    Document("france", "Paris is the capital of France.\n\nFrance is known for its wine and cheese.", "France"),
    Document("bananas", "Bananas are yellow fruit rich in potassium.", "Bananas"),
    Document("tower", "The Eiffel Tower in Paris was completed in 1889.", "Eiffel Tower"),
)


@dataclass
class Answered:
    """What a fake engine returns for every request, remembering the requests."""

    text: str
    requests: list[GenerationRequest]

    def submit(self, request: GenerationRequest):
        self.requests.append(request)
        result = GenerationResult(request.request_id, self.text, StopReason.EOS_TOKEN, 50, 9)

        class Stream:
            def result(self) -> GenerationResult:
                return result

        return Stream()


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory):
    opened = Retriever(RagConfig(rag_store=str(tmp_path_factory.mktemp("store"))))
    yield opened
    opened.close()


def test_the_prompt_numbers_the_relevant_passages(retriever: Retriever) -> None:
    hits = retriever.search("When was the Eiffel Tower in Paris completed?", DOCUMENTS, "", 3, None)
    system, user = answer_messages("When was it built?", hits)
    assert system.role == "system" and user.role == "user" and user.content == "When was it built?"
    expected = f"{SYSTEM_PROMPT}\n\nContext:\n[1] Eiffel Tower: The Eiffel Tower in Paris was completed in 1889."
    assert system.content.startswith(expected) and "bananas" not in system.content.lower()


def test_citations_name_real_sources_and_say_which_were_cited(retriever: Retriever) -> None:
    engine = Answered("It was completed in 1889 [1] [9].", [])
    query = RagQuery("When was the Eiffel Tower in Paris completed?", DOCUMENTS, request_id="r1", top_k=2)
    result = answer(query, retriever, engine.submit)
    assert engine.requests[0].messages[0].content.startswith(SYSTEM_PROMPT) and engine.requests[0].request_id == "r1"
    assert result.text == "It was completed in 1889 [1]."
    assert [(s.rank, s.cited) for s in result.sources] == [(1, True), (2, False)]
    assert result.sources[0].hit.passage.document_id == "tower" and result.result is not None


def test_uncited_sentences_are_attributed_when_a_passage_supports_them(retriever: Retriever) -> None:
    engine = Answered("The capital of France is Paris. Also, I like trains.", [])
    result = answer(RagQuery("What is the capital of France?", DOCUMENTS, top_k=3), retriever, engine.submit)
    first = result.sources[0]
    assert first.hit.passage.text == "Paris is the capital of France." and first.cited
    assert result.text == f"The capital of France is Paris [{first.rank}]. Also, I like trains."


def test_no_relevant_passage_means_no_generation_and_no_sources(retriever: Retriever) -> None:
    engine = Answered("never", [])
    result = answer(RagQuery("How do quantum computers factor numbers?", DOCUMENTS), retriever, engine.submit)
    assert result.text == NO_RELEVANT_DOCUMENTS and result.sources == () and result.result is None
    assert engine.requests == []
    anything = answer(
        RagQuery("How do quantum computers factor numbers?", DOCUMENTS, min_similarity=-1.0), retriever, engine.submit
    )
    assert anything.sources and len(engine.requests) == 1  # the request's own threshold wins


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(query=" ", documents=DOCUMENTS), "query"),
        (dict(query="q"), "documents"),
        (dict(query="q", documents=DOCUMENTS, top_k=0), "top_k"),
        (dict(query="q", documents=DOCUMENTS, top_k=21), "top_k"),
        (dict(query="q", collection="c", min_similarity=1.5), "min_similarity"),
    ],
)
def test_bad_queries_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        RagQuery(**kwargs)
    assert error.value.field == field


def test_a_store_folder_is_only_created_by_an_upsert(tmp_path: Path) -> None:
    retriever = Retriever(RagConfig(rag_store=str(tmp_path / "store")))
    assert retriever.collections() == [] and not (tmp_path / "store").exists()
    retriever.close()


def test_inline_documents_past_the_request_budget_are_refused_before_any_embedding(start_server) -> None:
    running = start_server(rag_options={"max_request_document_chars": 1000})
    documents = [{"id": f"d{i}", "text": "word " * 100} for i in range(3)]  # 1,500 characters together
    with pytest.raises(LoraserveRpcError) as refused:
        running.client.rag_query("What?", documents)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000 are allowed in one request" in refused.value.details
    assert running.server.retriever.embedder._embedder is None  # the model was never even loaded for it


def test_a_rag_query_whose_deadline_passes_while_embedding_ends_deadline_exceeded(
    start_server, monkeypatch, caplog
) -> None:
    """Its deadline travels with the embedding work: once it passes, the work stops between two batches and the
    server ends the call DEADLINE_EXCEEDED, without embedding the rest or generating."""
    from loraserve.server.retrieval.embedding import Embedder

    caplog.set_level(logging.INFO, logger="loraserve")
    running = start_server(rag_options={"embedding_batch_size": 1})
    forward, batches = Embedder._forward, []
    # 50 batches of at least 0.2 s each against a 1 s deadline (a slower machine only makes them slower)
    monkeypatch.setattr(
        Embedder, "_forward", lambda self, texts: (batches.append(1), time.sleep(0.2), forward(self, texts))[2]
    )
    documents = [{"id": f"d{i}", "text": f"Passage number {i} about topic {i}."} for i in range(50)]
    with pytest.raises(LoraserveRpcError) as late:
        running.client.rag_query("What is topic 3?", documents, timeout=1.0)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def refused() -> list[str]:
        return [getattr(r, "status", "") for r in caplog.records if r.getMessage() == "request refused"]

    wait_for(lambda: refused(), "the server to end the RagQuery")
    assert refused() == ["DEADLINE_EXCEEDED"] and len(batches) < 50
    assert running.server.engine.stats().completed_requests == 0  # no generation was started for it


def test_passages_that_overflow_the_context_are_refused_naming_what_the_caller_can_change(retriever) -> None:
    def too_long(request: GenerationRequest):  # what the engine says of a prompt past the context
        raise PromptTooLong("is 900 tokens, but the context holds 256 tokens; set truncate_input_tokens", "messages")

    query = RagQuery("When was the Eiffel Tower in Paris completed?", DOCUMENTS, top_k=3, min_similarity=-1.0)
    with pytest.raises(InvalidRequest, match="do not fit the model's context; lower top_k") as raised:
        answer(query, retriever, too_long)
    assert raised.value.field == "top_k" and "truncate_input_tokens" not in str(raised.value)

    def refused(request: GenerationRequest):  # any other refusal of the messages is passed on as it is
        raise InvalidRequest("the model's chat template refuses this conversation: roles must alternate", "messages")

    with pytest.raises(InvalidRequest, match="roles must alternate"):
        answer(query, retriever, refused)
