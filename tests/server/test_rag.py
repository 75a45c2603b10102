"""Retrieval for RagQuery: passages, BM25 ranking, the prompt, and honesty when nothing matches."""

from __future__ import annotations

import pytest

from loraserve.errors import InvalidRequest
from loraserve.server.params import GenerationRequest
from loraserve.server.rag import (
    MAX_PASSAGE_CHARS,
    NO_RELEVANT_DOCUMENTS,
    Document,
    RagQuery,
    answer,
    answer_messages,
    retrieve,
    split_passages,
)

DOCUMENTS = (
    Document("france", "Paris is the capital of France.\n\nFrance is known for its wine and cheese.", "France"),
    Document("bananas", "Bananas are yellow fruit rich in potassium.", "Bananas"),
    Document("tower", "The Eiffel Tower in Paris was completed in 1889.", "Eiffel Tower"),
)


def test_documents_split_into_paragraph_passages() -> None:
    passages = split_passages(Document("d", "one\n\n  \n\ntwo\nstill two\n\n" + "x" * 5000))
    assert [p.text for p in passages[:2]] == ["one", "two\nstill two"]
    assert len(passages[2].text) == MAX_PASSAGE_CHARS and [p.index for p in passages] == [0, 1, 2]


def test_bm25_ranks_the_matching_passages_first() -> None:
    sources = retrieve("What is the capital of France?", DOCUMENTS, top_k=3)
    assert sources[0].passage.document.id == "france" and sources[0].passage.index == 0
    assert [s.rank for s in sources] == list(range(1, len(sources) + 1))
    assert all(s.score > 0 for s in sources)
    assert "bananas" not in {s.passage.document.id for s in sources}


def test_top_k_bounds_the_sources() -> None:
    assert len(retrieve("Paris France", DOCUMENTS, top_k=1)) == 1


@pytest.mark.parametrize("query", ["quantum chromodynamics", "the of and"])
def test_nothing_relevant_means_no_sources(query: str) -> None:
    assert retrieve(query, DOCUMENTS, top_k=3) == []


def test_no_relevant_documents_answers_without_generating() -> None:
    def submit(request: GenerationRequest):
        raise AssertionError("nothing should be generated")

    result = answer(RagQuery("quantum chromodynamics", DOCUMENTS), submit)
    assert result.text == NO_RELEVANT_DOCUMENTS and result.sources == () and result.result is None


def test_the_prompt_numbers_passages_by_rank() -> None:
    sources = retrieve("Paris", DOCUMENTS, top_k=2)
    system, user = answer_messages("Where is Paris?", sources)
    assert system.role == "system" and "[1]" in system.content
    assert user.content.startswith("Context:\n[1] ") and "\n\n[2] " in user.content
    assert user.content.endswith("Question: Where is Paris?")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(query=" ", documents=DOCUMENTS), "query"),
        (dict(query="q", documents=()), "documents"),
        (dict(query="q", documents=DOCUMENTS, top_k=0), "top_k"),
        (dict(query="q", documents=(Document("", "t"),)), "documents[0].id"),
        (dict(query="q", documents=(Document("a", "t"), Document("a", "u"))), "documents[1].id"),
        (dict(query="q", documents=(Document("a", "  "),)), "documents[0].text"),
    ],
)
def test_bad_queries_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        RagQuery(**kwargs)
    assert error.value.field == field
