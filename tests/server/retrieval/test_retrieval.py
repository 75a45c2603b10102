"""Retrieval on its own: the collection store (upsert, delete, embeddings reused, persistence, the embedding model
recorded), hybrid search (threshold, keywords, near-duplicates, inline and stored together) and honest citations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from loraserve.errors import FailedPrecondition, InvalidRequest, NotFound
from loraserve.server.retrieval.citations import cite, supports
from loraserve.server.retrieval.documents import Document, check_collection_name, check_documents
from loraserve.server.retrieval.search import hybrid_search, keyword_query
from loraserve.server.retrieval.store import Collection, CollectionStore

DOCUMENTS = (
    Document(
        "eiffel",
        "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.\n\nIt is 330 metres tall.",
        "Eiffel Tower",
        {"lang": "en"},
    ),
    Document("bananas", "Bananas are yellow fruit rich in potassium.", "Bananas"),
    Document("errors", "Error E412 means a safety scanner is dirty. Wipe both lidar windows.", "Robot errors"),
    Document("tides", "Spring tides happen when the Sun and Moon line up at new and full moon.", "Tides"),
)


class CountingEmbedder:
    """The real embedder, counting the texts it embeds."""

    def __init__(self, embedder, identity: str | None = None) -> None:
        self.inner = embedder
        self.identity = identity or embedder.identity
        self.texts: list[str] = []

    def embed(self, texts):
        self.texts += list(texts)
        return self.inner.embed(texts)


@pytest.fixture
def store(tmp_path: Path):
    opened = CollectionStore(tmp_path / "collections")
    yield opened
    opened.close()


def create(store: CollectionStore, embedder, name: str = "kb") -> Collection:
    return store.get(name, create_for=(embedder.identity, embedder.dimensions))


def search(collections, embedder, query: str, top_k: int = 3, min_similarity: float = 0.35):
    return hybrid_search(collections, query, embedder.embed([query])[0], top_k, min_similarity)


def test_upsert_list_delete(store: CollectionStore, embedder) -> None:
    collection = create(store, embedder)
    outcome = collection.upsert(DOCUMENTS, embedder, 800, 150)
    assert (outcome.documents, outcome.passages, outcome.embedded) == (4, 5, 5)
    info = collection.info(embedder.identity)
    assert (info.documents, info.passages, info.compatible, info.embedding_model) == (4, 5, True, embedder.identity)
    assert info.size_bytes > 0 and info.created <= info.updated
    assert store.names() == ["kb"]
    deleted, missing = collection.delete(["bananas", "nope", "bananas"])
    assert (deleted, missing) == (1, ["nope"])
    assert collection.info(embedder.identity).passages == 4
    assert all(h.passage.document_id != "bananas" for h in search([collection], embedder, "yellow fruit", 5, -1))
    store.drop("kb")
    assert store.names() == [] and not list((store.root).iterdir())
    with pytest.raises(NotFound, match="no collection 'kb'"):
        store.get("kb")


def test_unchanged_passages_keep_their_embeddings(store: CollectionStore, embedder) -> None:
    collection = create(store, embedder)
    counting = CountingEmbedder(embedder)
    collection.upsert(DOCUMENTS, counting, 800, 150)
    counting.texts.clear()
    changed = Document("eiffel", DOCUMENTS[0].text.replace("330", "300"), "Eiffel Tower")
    outcome = collection.upsert([changed, DOCUMENTS[1]], counting, 800, 150)
    assert outcome.embedded == 1 and counting.texts == ["It is 300 metres tall."]
    hits = search([collection], embedder, "How tall is the Eiffel Tower?", 3, -1)
    assert "It is 300 metres tall." in [h.passage.text for h in hits]
    assert "It is 330 metres tall." not in [h.passage.text for h in hits]


def test_a_reopened_store_searches_without_embedding_again(tmp_path: Path, embedder) -> None:
    first = CollectionStore(tmp_path)
    create(first, embedder).upsert(DOCUMENTS, embedder, 800, 150)
    first.close()
    reopened = CollectionStore(tmp_path)
    counting = CountingEmbedder(embedder)
    collection = reopened.get("kb")
    question = "When was the tower in Paris built?"
    hits = hybrid_search([collection], question, counting.embed([question])[0], 1, 0.35)
    assert counting.texts == [question]  # only the question
    assert hits[0].passage.document_id == "eiffel" and hits[0].passage.metadata == {"lang": "en"}
    assert hits[0].passage.title == "Eiffel Tower" and hits[0].collection == "kb"
    reopened.close()


def test_another_embedding_model_is_refused_not_mixed(store: CollectionStore, embedder) -> None:
    create(store, embedder).upsert(DOCUMENTS, embedder, 800, 150)
    other = CountingEmbedder(embedder, identity="other-model@0123456789abcdef")
    collection = store.get("kb")
    assert not collection.info(other.identity).compatible
    with pytest.raises(FailedPrecondition, match=r"embedded with all-MiniLM-L6-v2@.* this server embeds with other"):
        collection.upsert(DOCUMENTS[:1], other, 800, 150)
    with pytest.raises(FailedPrecondition):
        collection.check_model(other.identity)
    assert other.texts == []


def test_nothing_below_the_threshold_is_returned(store: CollectionStore, embedder) -> None:
    collection = create(store, embedder)
    collection.upsert(DOCUMENTS, embedder, 800, 150)
    assert search([collection], embedder, "What is the best strategy for Monopoly?") == []
    assert search([collection], embedder, "the of and") == []
    hits = search([collection], embedder, "When was the Eiffel Tower finished?")
    assert hits and hits[0].passage.document_id == "eiffel" and all(h.similarity >= 0.35 for h in hits)
    everything = search([collection], embedder, "What is the best strategy for Monopoly?", 10, -1.0)
    assert len(everything) == 5  # with no threshold every passage is a candidate
    assert [h.score for h in everything] == sorted((h.score for h in everything), reverse=True)


def test_scores_fuse_similarity_and_keywords(store: CollectionStore, embedder) -> None:
    collection = create(store, embedder)
    collection.upsert(DOCUMENTS, embedder, 800, 150)
    hits = search([collection], embedder, "error E412", 5, -1.0)
    top = hits[0]
    assert top.passage.document_id == "errors" and top.bm25 is not None and top.bm25 > 0
    assert top.score == pytest.approx(0.8 * top.similarity + 0.2)  # the best keyword match counts 1
    unmatched = [h for h in hits if h.bm25 is None]
    assert unmatched and all(h.score == pytest.approx(0.8 * h.similarity) for h in unmatched)
    assert keyword_query('What is "E412" and the lidar?') == '"e412" OR "lidar"'


def test_near_duplicates_are_collapsed(store: CollectionStore, embedder) -> None:
    collection = create(store, embedder)
    copy = Document("eiffel-copy", DOCUMENTS[0].text, "Copy")
    collection.upsert([*DOCUMENTS, copy], embedder, 800, 150)
    hits = search([collection], embedder, "When was the Eiffel Tower completed?", 5, -1.0)
    texts = [h.passage.text for h in hits]
    assert len(texts) == len(set(texts)) == 5  # 7 passages, two of them copies


def test_inline_and_stored_documents_are_searched_together(store: CollectionStore, embedder) -> None:
    stored = create(store, embedder)
    stored.upsert(DOCUMENTS, embedder, 800, 150)
    inline = Collection.in_memory(embedder.identity, embedder.dimensions)
    inline.upsert([Document("cn", "The CN Tower in Toronto is 553 metres tall.")], embedder, 800, 150)
    hits = search([stored, inline], embedder, "How tall are the towers?", 3, 0.2)
    assert {(h.collection, h.passage.document_id) for h in hits} >= {("kb", "eiffel"), ("", "cn")}
    inline.close()


def test_a_write_cut_short_leaves_nothing(store: CollectionStore, embedder) -> None:
    collection = create(store, embedder)
    collection.upsert(DOCUMENTS[:1], embedder, 800, 150)

    class Failing(CountingEmbedder):
        def embed(self, texts):
            raise RuntimeError("embedding failed")

    with pytest.raises(RuntimeError):
        collection.upsert(DOCUMENTS[1:], Failing(embedder), 800, 150)
    assert collection.info(embedder.identity).documents == 1
    db = sqlite3.connect(store.root / "kb.sqlite")
    assert db.execute("SELECT count(*) FROM passages_fts").fetchone()[0] == 2
    db.close()


def test_citations_are_kept_removed_and_attributed_only_where_supported(embedder) -> None:
    passages = ["The Eiffel Tower was completed in 1889.", "Bananas are rich in potassium."]
    vectors = embedder.embed(passages)

    def cited(text: str):  # type: ignore[no-untyped-def]
        return cite(text, passages, vectors, embedder.embed)

    kept = cited("It was finished in 1889 [1] [7]. Also [0, 2].")
    assert kept.text == "It was finished in 1889 [1]. Also [2]." and kept.cited == {1, 2}
    attributed = cited("Bananas contain a lot of potassium. I like trains!")
    assert attributed.text == "Bananas contain a lot of potassium [2]. I like trains!" and attributed.cited == {2}
    wrong_number = cited("The Eiffel Tower was completed in 1901.")  # on topic, but the passage does not say it
    assert wrong_number.text == "The Eiffel Tower was completed in 1901." and wrong_number.cited == frozenset()
    assert cited("Quantum chromodynamics is hard.").cited == frozenset()
    assert cite("Anything [1].", [], np.zeros((0, 0), dtype=np.float32), embedder.embed).text == "Anything."
    assert supports(passages[0], "Completed in 1889, the Eiffel Tower!") and not supports(passages[0], "The of and")


def test_bad_documents_and_names_are_refused() -> None:
    good = Document("a", "text")
    cases = [
        ([good, good], 10, 100, "documents[1].id: 'a' is used by an earlier document"),
        ([Document("", "t")], 10, 100, "documents[0].id: must not be empty"),
        ([Document("a", " \n")], 10, 100, "documents[0].text: must not be empty"),
        ([Document("a", "x" * 101)], 10, 100, "documents[0].text: has 101 characters; at most 100"),
        ([good, Document("b", "t")], 1, 100, "documents: at most 1 documents are allowed, got 2"),
    ]
    for documents, most, chars, message in cases:
        with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_documents(documents, most, chars, "documents")
    for name in ("", "../x", "a/b", ".hidden", "x" * 65, "naïve"):
        with pytest.raises(InvalidRequest, match="is not a collection name"):
            check_collection_name(name)
    check_collection_name("Team-docs_v2.1")
