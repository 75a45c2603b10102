"""The retrieval side of RAG in one object: the collection store, the embedding model and the search settings. The
servicers call it; it never sees gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loraserve.config import RagConfig
from loraserve.errors import InvalidRequest
from loraserve.server.retrieval.citations import CitedAnswer, cite
from loraserve.server.retrieval.documents import Document, check_collection_name
from loraserve.server.retrieval.embedding import LazyEmbedder
from loraserve.server.retrieval.fair_worker import UNBOUNDED, Budget
from loraserve.server.retrieval.search import Hit, hybrid_search
from loraserve.server.retrieval.store import Collection, CollectionInfo, CollectionStore, UpsertOutcome


class Retriever:
    def __init__(self, config: RagConfig) -> None:
        self.config = config
        self.store = CollectionStore(Path(config.rag_store).expanduser())
        self.embedder = LazyEmbedder(config.embedding_model, config.embedding_device, config.embedding_batch_size)

    @property
    def embedding_model(self) -> str:
        return self.config.embedding_model if self.config.embedding_model != "default" else "all-MiniLM-L6-v2"

    def search(
        self,
        query: str,
        documents: Sequence[Document],
        collection: str,
        top_k: int,
        min_similarity: float | None,
        budget: Budget = UNBOUNDED,
    ) -> list[Hit]:
        """The passages for a question, from inline documents, a stored collection, or both; the embedding work
        ends at the request's deadline, or when its caller has gone."""
        embedder = self.embedder.get().for_request(budget)
        sources: list[Collection] = []
        if collection:
            check_collection_name(collection)
            stored = self.store.get(collection)
            stored.check_model(embedder.identity)
            sources.append(stored)
        inline = Collection.in_memory(embedder.identity, embedder.dimensions) if documents else None
        try:
            if inline is not None:
                inline.upsert(documents, embedder, self.config.rag_passage_chars, self.config.rag_passage_overlap_chars)
                sources.append(inline)
            return hybrid_search(
                sources,
                query,
                embedder.embed([query])[0],
                top_k,
                self.config.rag_min_similarity if min_similarity is None else min_similarity,
                self.config.rag_candidates,
            )
        finally:
            if inline is not None:
                inline.close()

    def cite(self, answer: str, hits: Sequence[Hit], budget: Budget = UNBOUNDED) -> CitedAnswer:
        vectors = np.stack([h.vector for h in hits]) if hits else np.zeros((0, 0), dtype=np.float32)
        embedder = self.embedder.get().for_request(budget)
        return cite(answer, [h.passage.text for h in hits], vectors, embedder.embed)

    def upsert(
        self, name: str, documents: Sequence[Document], budget: Budget = UNBOUNDED
    ) -> tuple[UpsertOutcome, CollectionInfo]:
        check_collection_name(name)
        embedder = self.embedder.get().for_request(budget)
        outcome, collection = self.store.upsert(
            name,
            documents,
            embedder,
            embedder.dimensions,
            self.config.rag_passage_chars,
            self.config.rag_passage_overlap_chars,
        )
        return outcome, collection.info(embedder.identity)

    def delete_documents(self, name: str, document_ids: Sequence[str]) -> tuple[int, list[str], CollectionInfo]:
        check_collection_name(name)
        if not document_ids:
            raise InvalidRequest("must contain at least one id", "document_ids")
        collection = self.store.get(name)
        deleted, not_found = collection.delete(document_ids)
        return deleted, not_found, collection.info(self.embedder.identity)

    def collections(self) -> list[CollectionInfo]:
        identity = self.embedder.identity
        return [self.store.get(name).info(identity) for name in self.store.names()]

    def drop(self, name: str) -> None:
        check_collection_name(name, "name")
        self.store.drop(name)

    def close(self) -> None:
        self.store.close()
        self.embedder.close()
