"""Retrieval-augmented answers: retrieve the passages for a question (inline documents, a stored collection, or
both), give the model the relevant ones as numbered context, and answer with honest citations. When no passage is
relevant, say that the documents do not cover the question instead of answering from nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loraserve.errors import InvalidRequest
from loraserve.prompting import Message
from loraserve.server.engine.outputs import GenerationResult
from loraserve.server.engine.params import GenerationRequest, OutputConstraint, SamplingParams, StoppingParams
from loraserve.server.engine.preparation import PromptTooLong
from loraserve.server.engine.request_stream import RequestStream
from loraserve.server.retrieval.documents import Document
from loraserve.server.retrieval.fair_worker import Budget
from loraserve.server.retrieval.retriever import Retriever
from loraserve.server.retrieval.search import Hit

DEFAULT_TOP_K = 3
MAX_TOP_K = 20
NO_RELEVANT_DOCUMENTS = "The documents do not cover this question: no passage in them is relevant enough to answer it."
SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Cite the passages you use as [1], [2]. "
    "If the passages do not contain the answer, say that the documents do not cover the question."
)


@dataclass(frozen=True)
class Source:
    """A passage given to the model, numbered by rank in the prompt."""

    hit: Hit
    rank: int
    cited: bool


@dataclass(frozen=True)
class RagQuery:
    """A question over inline documents, a stored collection, or both, with the generation settings for the
    answer. The documents' count and sizes are checked against the server's limits before this is built."""

    query: str
    documents: tuple[Document, ...] = ()
    collection: str = ""
    top_k: int = DEFAULT_TOP_K
    min_similarity: float | None = None
    adapter_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    constraint: OutputConstraint | None = None
    request_id: str = ""
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise InvalidRequest("must not be empty", "query")
        if not self.documents and not self.collection:
            raise InvalidRequest("give documents, a collection, or both", "documents")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"must be in [1, {MAX_TOP_K}], got {self.top_k}", "top_k")
        if self.min_similarity is not None and not -1 <= self.min_similarity <= 1:
            raise InvalidRequest(f"must be in [-1, 1], got {self.min_similarity}", "min_similarity")


@dataclass(frozen=True)
class RagAnswer:
    """The answer, the passages it was given, and the generation result (None when nothing was relevant)."""

    request_id: str
    text: str
    sources: tuple[Source, ...]
    result: GenerationResult | None


def answer_messages(query: str, hits: Sequence[Hit]) -> tuple[Message, ...]:
    """The chat that asks the model to answer from the numbered passages: instructions and passages as the system
    message, the question alone as the user's (small models answered the question far more often this way than with
    the passages in the user message)."""
    context = "\n\n".join(
        f"[{rank}] {hit.passage.title + ': ' if hit.passage.title else ''}{hit.passage.text}"
        for rank, hit in enumerate(hits, start=1)
    )
    return (Message("system", f"{SYSTEM_PROMPT}\n\nContext:\n{context}"), Message("user", query))


def answer(
    query: RagQuery,
    retriever: Retriever,
    submit: Callable[[GenerationRequest], RequestStream],
    on_stream: Callable[[RequestStream], None] = lambda stream: None,
    abandoned: Callable[[], bool] = lambda: False,
) -> RagAnswer:
    """Retrieve, then generate the answer through `submit` (the engine's); on_stream sees the stream to cancel it.
    The embedding work ends at the query's deadline or once abandoned() says its caller has gone. Under an output
    constraint the answer is generated even when no passage is relevant (the canned reply would not satisfy it), and
    its text is returned as generated: no citation markers are added to it."""
    budget = Budget(query.deadline, abandoned)
    hits = retriever.search(query.query, query.documents, query.collection, query.top_k, query.min_similarity, budget)
    if not hits and query.constraint is None:
        return RagAnswer(request_id=query.request_id, text=NO_RELEVANT_DOCUMENTS, sources=(), result=None)
    request = GenerationRequest(
        messages=answer_messages(query.query, hits),
        adapter_id=query.adapter_id,
        sampling=query.sampling,
        stopping=query.stopping,
        constraint=query.constraint,
        request_id=query.request_id,
        deadline=query.deadline,
    )
    try:
        stream = submit(request)
    except PromptTooLong:
        raise InvalidRequest(  # the caller sent no messages: say what it can change
            f"the question and its {len(hits)} passages do not fit the model's context; lower top_k",
            "top_k",
        ) from None
    on_stream(stream)
    result = stream.result()
    if query.constraint is not None:
        sources = tuple(Source(hit, rank, False) for rank, hit in enumerate(hits, start=1))
        return RagAnswer(request_id=query.request_id, text=result.text, sources=sources, result=result)
    cited = retriever.cite(result.text, hits, budget)
    sources = tuple(Source(hit, rank, rank in cited.cited) for rank, hit in enumerate(hits, start=1))
    return RagAnswer(request_id=query.request_id, text=cited.text, sources=sources, result=result)
