"""Retrieval quality and speed on the project's labelled set (bench/data/retrieval), one run, one machine.

Quality: the 57 documents (228 passages) are stored in a collection and each labelled question is asked; the
answering passage is the one of the labelled document that contains the labelled text. Reports recall@1/3/5 and MRR
(over the top 10) for BM25 alone, embeddings alone and the hybrid (rank fusion) the server uses, and for the
threshold: how many answerable questions keep their answer and how many unanswerable ones get no source at all.

Speed: a collection of --passages passages (the real ones plus distractors recombined from their sentences, none
holding a labelled answer) is upserted (passages/s, embeddings included) and every question is asked once
(retrieval only, no generation): latency percentiles and recall in that haystack. Then the two ways to run the
embedding model, sentence-transformers and plain transformers (what the server uses), embed the passages side by side.

    .venv/bin/python bench/retrieval.py                     # 10,000 passages; writes bench/results/retrieval-cpu.json
    .venv/bin/python bench/retrieval.py --passages 2000
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from loraserve.config import RagConfig
from loraserve.server.retrieval.documents import Document
from loraserve.server.retrieval.embedding import Embedder, resolve_embedding_folder
from loraserve.server.retrieval.search import hybrid_search, keyword_query
from loraserve.server.retrieval.store import Collection, CollectionStore

from common import machine, percentile

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_PASSAGES = 64  # one batch through each embedder before it is timed
DATA = ROOT / "bench" / "data" / "retrieval"
_HEADING = re.compile(r"^## (\S+) \| (.+)$", re.MULTILINE)
DEPTH = 10  # MRR looks at the top 10


@dataclass(frozen=True)
class Question:
    text: str
    document_id: str | None  # None: no document answers it
    answer: str | None  # text only the answering passage contains


def load_documents(folder: Path = DATA) -> list[Document]:
    documents = []
    for path in sorted(folder.glob("corpus-*.md")):
        text = path.read_text()
        headings = list(_HEADING.finditer(text))
        for heading, following in zip(headings, [*headings[1:], None], strict=True):
            body = text[heading.end() : following.start() if following else len(text)].strip()
            documents.append(Document(id=heading[1], title=heading[2], text=body))
    return documents


def load_questions(folder: Path = DATA) -> list[Question]:
    questions = []
    for line in (folder / "questions.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        text, document_id, answer = line.split("\t")
        questions.append(Question(text, None if document_id == "-" else document_id, None if answer == "-" else answer))
    return questions


def answering_passage(collection: Collection, question: Question) -> int:
    """The id of the one passage of the labelled document that contains the labelled text."""
    index = collection.index()
    stored = collection.passages(index.ids.tolist())
    matches = [p.id for p in stored.values() if p.document_id == question.document_id and question.answer in p.text]
    if len(matches) != 1:
        raise SystemExit(f"label of {question.text!r} matches {len(matches)} passages; fix questions.tsv")
    return matches[0]


def rankings(collection: Collection, question: str, vector: np.ndarray, candidates: int) -> dict[str, list[int]]:
    """The top passage ids for a question by BM25, by embedding similarity, by the server's hybrid (no threshold),
    and, for comparison, by reciprocal rank fusion of the first two (sum of 1 / (60 + rank))."""
    index = collection.index()
    match = keyword_query(question)
    bm25 = [pid for pid, _ in collection.keyword_search(match, candidates)] if match else []
    similarities = index.vectors @ vector
    dense = [int(index.ids[i]) for i in np.argsort(-similarities)[:candidates]]
    hybrid = [h.passage.id for h in hybrid_search([collection], question, vector, DEPTH, -1.0, candidates)]
    fused: dict[int, float] = {}
    for ranking in (bm25, dense):
        for rank, pid in enumerate(ranking, start=1):
            fused[pid] = fused.get(pid, 0.0) + 1 / (60 + rank)
    rrf = sorted(fused, key=lambda pid: -fused[pid])
    return {"bm25": bm25[:DEPTH], "dense": dense[:DEPTH], "hybrid": hybrid, "rrf": rrf[:DEPTH]}


def quality(ranked: list[tuple[int, dict[str, list[int]]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for method in ("bm25", "dense", "hybrid", "rrf"):
        ranks = [r[method].index(answer) + 1 if answer in r[method] else None for answer, r in ranked]
        out[method] = {
            **{f"recall@{k}": sum(1 for x in ranks if x is not None and x <= k) / len(ranks) for k in (1, 3, 5)},
            "mrr": sum(1 / x for x in ranks if x is not None) / len(ranks),
        }
    return out


def threshold_sweep(
    collection: Collection, questions: list[Question], vectors: np.ndarray, answers: dict[str, int]
) -> list[dict[str, float]]:
    """For each min_similarity: answerable questions whose answer is still among the top 3, and unanswerable
    questions correctly left without any source (the trade-off --rag-min-similarity sets)."""
    answerable = sum(1 for q in questions if q.document_id)
    sweep = []
    for minimum in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        kept = refused = 0
        for question, vector in zip(questions, vectors, strict=True):
            hits = hybrid_search([collection], question.text, vector, 3, minimum)
            if question.document_id is None:
                refused += not hits
            else:
                kept += answers[question.text] in [h.passage.id for h in hits]
        sweep.append(
            {
                "min_similarity": minimum,
                "answerable_with_answer_in_top3": kept / answerable,
                "unanswerable_without_sources": refused / (len(questions) - answerable),
            }
        )
    return sweep


def distractors(documents: list[Document], answers: list[str], count: int, seed: int = 0) -> list[Document]:
    """Passages recombined from the corpus's sentences, leaving out every sentence that holds a labelled answer."""
    sentences = [
        s
        for d in documents
        for s in re.split(r"(?<=[.!?])\s+", d.text.replace("\n\n", " "))
        if not any(a in s for a in answers)
    ]
    rng = random.Random(seed)
    return [Document(id=f"distractor-{i}", title="", text=" ".join(rng.sample(sentences, 3))) for i in range(count)]


def compare_embedders(texts: list[str], repeats: int) -> dict[str, object]:
    """Passages per second embedding `texts` with sentence-transformers and with plain transformers (the server)."""
    import torch

    folder, _ = resolve_embedding_folder("default")
    ours = Embedder("default")
    results: dict[str, object] = {}
    timings = {}
    vectors = {}
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    runners: dict[str, Callable[[list[str]], Any]] = {
        # the cache emptied first: this measures the model, not repeated texts
        "transformers (server)": lambda batch: (ours._cache.clear(), ours.embed(batch))[1]
    }
    if SentenceTransformer is not None:
        model = SentenceTransformer(str(folder), device="cpu")
        runners["sentence-transformers"] = lambda batch: model.encode(batch, batch_size=64, normalize_embeddings=True)
    for name, run in runners.items():
        run(texts[:WARM_UP_PASSAGES])
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            vectors[name] = run(texts)
            best = min(best, time.perf_counter() - started)
        timings[name] = len(texts) / best
    ours.close()
    results["passages_per_second"] = timings
    if len(vectors) == 2:
        a, b = vectors.values()
        results["max_abs_difference"] = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        results["transformers_vs_sentence_transformers"] = (
            timings["transformers (server)"] / timings["sentence-transformers"]
        )
    results["torch_threads"] = torch.get_num_threads()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=10_000, help="size of the collection latency is measured on")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the embedder comparison (best is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    config = RagConfig()
    documents, questions = load_documents(), load_questions()
    embedder = Embedder("default")
    summary: dict[str, object] = {"machine": machine(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as folder:
        store = CollectionStore(Path(folder))
        labelled = store.get("labelled", create_for=(embedder.identity, embedder.dimensions))
        labelled.upsert(documents, embedder, config.rag_passage_chars, config.rag_passage_overlap_chars)
        answers = {q.text: answering_passage(labelled, q) for q in questions if q.document_id}
        vectors = embedder.embed([q.text for q in questions])
        ranked = [
            (answers[q.text], rankings(labelled, q.text, v, config.rag_candidates))
            for q, v in zip(questions, vectors, strict=True)
            if q.document_id
        ]
        summary["labelled_set"] = {
            "documents": len(documents),
            "passages": len(labelled.index().ids),
            "questions": len(ranked),
            "unanswerable_questions": len(questions) - len(ranked),
            "quality": quality(ranked),
            "default_min_similarity": config.rag_min_similarity,
            "threshold_sweep": threshold_sweep(labelled, questions, vectors, answers),
        }
        passage_texts = [p.text for p in labelled.passages(labelled.index().ids.tolist()).values()]

        filler = distractors(documents, [q.answer for q in questions if q.answer], args.passages - len(passage_texts))
        haystack = store.get("haystack", create_for=(embedder.identity, embedder.dimensions))
        haystack.upsert(documents, embedder, config.rag_passage_chars, config.rag_passage_overlap_chars)
        started = time.perf_counter()
        batch = 256
        for first in tqdm(range(0, len(filler), batch), desc="upsert", unit="batch", file=sys.stderr):
            haystack.upsert(
                filler[first : first + batch], embedder, config.rag_passage_chars, config.rag_passage_overlap_chars
            )
        upsert_seconds = time.perf_counter() - started
        size = len(haystack.index().ids)
        latencies, found = [], 0
        answerable = [q for q in questions if q.document_id]
        fresh = Embedder("default")  # nothing cached: every question is embedded, as a new one would be
        for question in questions:
            started = time.perf_counter()
            vector = fresh.embed([question.text])[0]
            hits = hybrid_search([haystack], question.text, vector, 3, config.rag_min_similarity, config.rag_candidates)
            latencies.append(time.perf_counter() - started)
            if question.document_id:
                found += answering_passage(haystack, question) in [h.passage.id for h in hits]
        summary["collection"] = {
            "passages": size,
            "upsert_passages_per_second": len(filler) / upsert_seconds,
            "query_ms_p50": percentile(latencies, 50) * 1000,
            "query_ms_p95": percentile(latencies, 95) * 1000,
            "recall@3_with_threshold": found / len(answerable),
        }
        fresh.close()
        store.close()
    embedder.close()
    summary["embedders"] = compare_embedders(passage_texts, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrieval-cpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
