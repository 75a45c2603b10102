"""RagQuery's answer: the prompt numbers the relevant passages, the answer's citations name real sources, and when
nothing is relevant the server says so without generating."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from loraserve.config import RagConfig
from loraserve.errors import InvalidRequest
from loraserve.server.engine.outputs import GenerationResult, StopReason
from loraserve.server.engine.params import GenerationRequest
from loraserve.server.retrieval.documents import Document
from loraserve.server.retrieval.rag import NO_RELEVANT_DOCUMENTS, SYSTEM_PROMPT, RagQuery, answer, answer_messages
from loraserve.server.retrieval.retriever import Retriever

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
