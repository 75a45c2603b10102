"""Hybrid retrieval: a keyword ranking (BM25, SQLite FTS5) and an embedding ranking (cosine similarity), fused.

The score, stated once: score = 0.8 * cosine + 0.2 * bm25 / best_bm25, over the candidates of both rankings (the
top `candidates` of each), where best_bm25 is the highest BM25 among this question's candidates and a passage the
keyword search did not find counts 0 there. So the score is in [-0.8, 1], and the keyword match moves passages of
similar meaning apart: exact terms such as error codes and names count, without letting a passage that only shares
words beat one that answers. (Measured on the labelled set, bench/retrieval.py: this convex combination ranks better
than reciprocal rank fusion, which lifts passages both rankings find half-way over the one the embeddings put first.)

Whether a passage may be used at all is decided by its cosine similarity to the question alone (min_similarity):
the fused score is relative to the question's best keyword match, and the similarity is what says that no document
is about the question. Passages nearly identical to a better one (cosine >= 0.95) are dropped, so that a document
stored twice does not fill the context twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loraserve.server.retrieval.stopwords import STOPWORDS
from loraserve.server.retrieval.store import Collection, StoredPassage

DENSE_WEIGHT = 0.8
DUPLICATE_SIMILARITY = 0.95
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Hit:
    """A retrieved passage with its scores."""

    collection: str  # "" for an inline document
    passage: StoredPassage
    score: float  # the fused score (see the module docstring)
    similarity: float  # cosine similarity to the question
    bm25: float | None  # BM25 score when the keyword search found it
    vector: np.ndarray  # the passage's unit embedding


def keyword_query(query: str) -> str:
    """An FTS5 query matching any of the question's words but stop words ("" when none is left)."""
    words = dict.fromkeys(w for w in _WORD.findall(query.lower()) if w not in STOPWORDS)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


@dataclass
class _Candidate:
    collection: Collection
    passage_id: int
    similarity: float
    vector: np.ndarray
    bm25: float | None = None


def _candidates(
    collections: Sequence[Collection], query: str, query_vector: np.ndarray, limit: int
) -> tuple[list[_Candidate], list[_Candidate]]:
    """The top `limit` of each ranking over all the collections: by similarity, and by BM25."""
    by_key: dict[tuple[int, int], _Candidate] = {}
    dense: list[_Candidate] = []
    keyword: list[_Candidate] = []
    match = keyword_query(query)
    for c, collection in enumerate(collections):
        index = collection.index()
        if len(index.ids) == 0:
            continue
        similarities = index.vectors @ query_vector  # [N]
        top = np.argpartition(-similarities, min(limit, len(similarities)) - 1)[:limit]
        for row in top:
            candidate = _Candidate(collection, int(index.ids[row]), float(similarities[row]), index.vectors[row])
            by_key[(c, candidate.passage_id)] = candidate
            dense.append(candidate)
        if not match:
            continue
        found = collection.keyword_search(match, limit)
        rows = index.rows([pid for pid, _ in found])
        for (passage_id, bm25), row in zip(found, rows, strict=True):
            if row >= len(index.ids) or index.ids[row] != passage_id:
                continue  # upserted after the vectors were read: the next search will see it
            candidate = by_key.get((c, passage_id))
            if candidate is None:
                vector = index.vectors[row]
                candidate = _Candidate(collection, passage_id, float(vector @ query_vector), vector)
                by_key[(c, passage_id)] = candidate
            candidate.bm25 = bm25
            keyword.append(candidate)
    dense.sort(key=lambda x: -x.similarity)
    keyword.sort(key=lambda x: -(x.bm25 or 0.0))
    return dense[:limit], keyword[:limit]


def hybrid_search(
    collections: Sequence[Collection],
    query: str,
    query_vector: np.ndarray,
    top_k: int,
    min_similarity: float,
    candidates: int = 50,
) -> list[Hit]:
    """The top_k passages by fused score among those with similarity >= min_similarity, near-duplicates removed."""
    dense, keyword = _candidates(collections, query, query_vector, candidates)
    unique = {id(c): c for c in dense + keyword}
    best_bm25 = max((c.bm25 for c in keyword if c.bm25), default=0.0)

    def score(candidate: _Candidate) -> float:
        keyword_part = (candidate.bm25 or 0.0) / best_bm25 if best_bm25 > 0 else 0.0
        return DENSE_WEIGHT * candidate.similarity + (1 - DENSE_WEIGHT) * keyword_part

    fused = {key: score(c) for key, c in unique.items()}
    ordered = sorted(unique.values(), key=lambda x: (-fused[id(x)], -x.similarity))
    chosen: list[_Candidate] = []
    for candidate in ordered:
        if len(chosen) == top_k:
            break
        if candidate.similarity < min_similarity:
            continue
        if any(float(candidate.vector @ other.vector) >= DUPLICATE_SIMILARITY for other in chosen):
            continue
        chosen.append(candidate)
    hits: list[Hit] = []
    for collection in {id(c.collection): c.collection for c in chosen}.values():
        stored = collection.passages([c.passage_id for c in chosen if c.collection is collection])
        hits += [  # a passage deleted since the search began is left out
            Hit(collection.name, stored[c.passage_id], fused[id(c)], c.similarity, c.bm25, c.vector)
            for c in chosen
            if c.collection is collection and c.passage_id in stored
        ]
    hits.sort(key=lambda h: (-h.score, -h.similarity))
    return hits
