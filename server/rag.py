"""Retrieval-augmented answers over inline documents: split documents into passages, rank them with BM25, put the
best ones into the prompt as numbered context, and answer. When nothing matches, say so instead of inventing sources.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import bm25s
import numpy as np

from loraserve.errors import InvalidRequest
from loraserve.prompting import Message
from loraserve.server.outputs import GenerationResult
from loraserve.server.params import GenerationRequest, SamplingParams, StoppingParams
from loraserve.server.request_stream import RequestStream

DEFAULT_TOP_K = 3
MAX_TOP_K = 20
# A passage longer than this is cut in the prompt (and reported as cut), so one huge paragraph cannot fill the context.
MAX_PASSAGE_CHARS = 1500
NO_RELEVANT_DOCUMENTS = (
    "No relevant documents: none of the documents given matches the question, so it is not answered."
)
SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Cite the passages you use as [1], [2]. "
    "If the passages do not contain the answer, say that the documents do not cover the question."
)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Document:
    """A caller's document."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Passage:
    """A paragraph of a document: the unit that is scored and shown to the model."""

    document: Document
    index: int
    text: str


@dataclass(frozen=True)
class Source:
    """A passage chosen for the prompt."""

    passage: Passage
    score: float
    rank: int


@dataclass(frozen=True)
class RagQuery:
    """A question over inline documents, with the generation settings for the answer."""

    query: str
    documents: tuple[Document, ...]
    top_k: int = DEFAULT_TOP_K
    adapter_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    request_id: str = ""
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise InvalidRequest("must not be empty", "query")
        if not self.documents:
            raise InvalidRequest("must contain at least one document", "documents")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"must be in [1, {MAX_TOP_K}], got {self.top_k}", "top_k")
        seen: set[str] = set()
        for i, document in enumerate(self.documents):
            if not document.id:
                raise InvalidRequest("must not be empty", f"documents[{i}].id")
            if document.id in seen:
                raise InvalidRequest(
                    f"{document.id!r} is used by an earlier document; ids must be unique", f"documents[{i}].id"
                )
            if not document.text.strip():
                raise InvalidRequest("must not be empty", f"documents[{i}].text")
            seen.add(document.id)


@dataclass(frozen=True)
class RagAnswer:
    """The answer, the passages it was given, and the generation result (None when nothing was relevant)."""

    request_id: str
    text: str
    sources: tuple[Source, ...]
    result: GenerationResult | None


def split_passages(document: Document) -> list[Passage]:
    """The document's paragraphs (split at blank lines), each cut to MAX_PASSAGE_CHARS."""
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(document.text) if p.strip()]
    return [Passage(document, i, p[:MAX_PASSAGE_CHARS]) for i, p in enumerate(paragraphs)]


def _tokens(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def retrieve(query: str, documents: tuple[Document, ...], top_k: int) -> list[Source]:
    """The top_k passages by BM25 score; only passages that share a term with the query (score > 0)."""
    passages = [p for d in documents for p in split_passages(d)]
    query_terms = _tokens([query])[0]
    if not query_terms:
        return []
    index = bm25s.BM25()
    index.index(_tokens([p.text for p in passages]), show_progress=False)
    scores = index.get_scores(query_terms)  # [P]
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [Source(passages[i], float(scores[i]), rank) for rank, i in enumerate(order, 1) if scores[i] > 0]


def answer_messages(query: str, sources: list[Source]) -> tuple[Message, ...]:
    """The chat that asks the model to answer from the numbered passages."""
    context = "\n\n".join(
        f"[{s.rank}] {s.passage.document.title + ': ' if s.passage.document.title else ''}{s.passage.text}"
        for s in sources
    )
    return (
        Message("system", SYSTEM_PROMPT),
        Message("user", f"Context:\n{context}\n\nQuestion: {query}"),
    )


def answer(
    query: RagQuery,
    submit: Callable[[GenerationRequest], RequestStream],
    on_stream: Callable[[RequestStream], None] = lambda stream: None,
) -> RagAnswer:
    """Retrieve, then generate the answer through `submit` (the engine's); on_stream sees the stream to cancel it."""
    sources = retrieve(query.query, query.documents, query.top_k)
    if not sources:
        return RagAnswer(request_id=query.request_id, text=NO_RELEVANT_DOCUMENTS, sources=(), result=None)
    request = GenerationRequest(
        messages=answer_messages(query.query, sources),
        adapter_id=query.adapter_id,
        sampling=query.sampling,
        stopping=query.stopping,
        request_id=query.request_id,
        deadline=query.deadline,
    )
    stream = submit(request)
    on_stream(stream)
    result = stream.result()
    return RagAnswer(request_id=query.request_id, text=result.text, sources=tuple(sources), result=result)
