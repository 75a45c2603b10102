"""Collections of documents, stored in SQLite: one database file per collection under the store folder.

Why SQLite: it is in Python's standard library, one file per collection, and transactional: with the write-ahead log
and synchronous=FULL, an upsert that has returned survives a crash, a kill -9 or a power cut, and one cut short
leaves nothing half-written. Its FTS5 extension gives the keyword (BM25) ranking. Embeddings are stored beside the
passages as float32 blobs, so a restart reads them back instead of embedding again; the embedding search is an exact
matrix product in memory (10,000 passages x 384 dimensions is 15 MB and a millisecond). A vector extension
(sqlite-vec) would do the same brute-force search, but Python builds without extension loading (such as this one)
cannot use it; ANN indexes (LanceDB, Chroma's HNSW) pay off far beyond the sizes one server's RAG holds.

A new collection is built in a staging file with its first documents and renamed into place in one step, so that a
crash never leaves an empty or half-built collection visible; the staging file of a killed process is removed when
the store next opens.

Each collection records the embedding model it was built with (name@fingerprint of the weights): a server with
another model refuses to search or extend it (FAILED_PRECONDITION) instead of mixing vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from loraserve.errors import FailedPrecondition, NotFound
from loraserve.files import remove_abandoned, staging_prefix, sync_folder
from loraserve.server.retrieval.chunking import Chunk, split_passages
from loraserve.server.retrieval.documents import Document

SCHEMA_VERSION = "1"
SUFFIX = ".sqlite"
CREATING = "creating"  # the staging kind of a collection being created
SQL_BATCH = 500  # bound on the ? parameters of one statement
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, metadata TEXT NOT NULL, "
    "chars INTEGER NOT NULL, text_sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS passages (id INTEGER PRIMARY KEY, document_id TEXT NOT NULL, idx INTEGER NOT NULL, "
    "text TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, text_sha256 TEXT NOT NULL, "
    "embedding BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS passages_by_document ON passages (document_id)",
    "CREATE INDEX IF NOT EXISTS passages_by_text ON passages (text_sha256)",
    # Keyword index; its rowid is the passage id. porter: "batches" matches "batching".
    "CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts "
    "USING fts5 (text, tokenize = 'porter unicode61 remove_diacritics 2')",
)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StoredPassage:
    """A passage and the document it belongs to."""

    id: int
    document_id: str
    title: str
    metadata: dict[str, str]
    index: int
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    documents: int
    passages: int
    embedding_model: str
    compatible: bool
    size_bytes: int
    created: float  # unix seconds
    updated: float


@dataclass(frozen=True)
class UpsertOutcome:
    documents: int
    passages: int
    embedded: int  # passages embedded now; the rest reused the stored vector of the same text


@dataclass(frozen=True)
class VectorIndex:
    """The collection's embeddings in memory: ids ascending, vectors[i] the unit vector of passage ids[i]."""

    ids: np.ndarray  # [N] int64
    vectors: np.ndarray  # [N, D] float32

    def rows(self, passage_ids: Sequence[int]) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(passage_ids, dtype=np.int64))


class Embeds(Protocol):
    """What a collection needs from the embedding model (see embedding.Embedder)."""

    identity: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _batches(items: Sequence, size: int = SQL_BATCH) -> Iterable[Sequence]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


class Collection:
    """One collection: its SQLite database (a file, or memory for a request's inline documents) and its vectors in
    memory. Safe to share between threads: writes and keyword queries hold the collection's lock; the embedding
    search reads an immutable snapshot."""

    def __init__(self, name: str, path: Path | None, embedding_model: str, dimensions: int) -> None:
        self.name = name
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(path) if path else ":memory:", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._closed = False
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                self._db.execute(statement)
            now = str(time.time())
            defaults = {
                "schema_version": SCHEMA_VERSION,
                "embedding_model": embedding_model,
                "dimensions": str(dimensions),
                "created": now,
                "updated": now,
            }
            self._db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", defaults.items())
            self._db.execute("COMMIT")
            self.meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self._index: VectorIndex | None = None

    @classmethod
    def in_memory(cls, embedding_model: str, dimensions: int) -> Collection:
        """A throwaway collection for a request's inline documents."""
        return cls("", None, embedding_model, dimensions)

    @property
    def embedding_model(self) -> str:
        return self.meta["embedding_model"]

    def check_model(self, identity: str) -> None:
        if identity != self.embedding_model:
            raise FailedPrecondition(
                f"collection {self.name!r} was embedded with {self.embedding_model}, but this server embeds with "
                f"{identity}; serve with that model again, or delete the collection and upsert its documents again"
            )

    def _require_open(self) -> None:
        if self._closed:
            raise NotFound(f"collection {self.name!r} was deleted")

    # ---- writing ----------------------------------------------------------------------------------------------

    def upsert(
        self, documents: Sequence[Document], embedder: Embeds, max_chars: int, overlap_chars: int
    ) -> UpsertOutcome:
        """Store the documents (replacing those with the same ids), durably, in one transaction."""
        self.check_model(embedder.identity)
        chunks = {d.id: split_passages(d.text, max_chars, overlap_chars) for d in documents}
        texts = [c.text for cs in chunks.values() for c in cs]
        vectors = self._stored_vectors({sha256(t) for t in texts})
        to_embed = list(dict.fromkeys(t for t in texts if sha256(t) not in vectors))
        if to_embed:
            for text, vector in zip(to_embed, embedder.embed(to_embed), strict=True):
                vectors[sha256(text)] = vector
        with self._lock:
            self._require_open()
            removed, added = self._write(documents, chunks, vectors)
            self._update_index(removed, added)
        return UpsertOutcome(len(documents), len(texts), len(to_embed))

    def _stored_vectors(self, hashes: set[str]) -> dict[str, np.ndarray]:
        """Vectors already stored for passages with these texts."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            self._require_open()
            for batch in _batches(sorted(hashes)):
                rows = self._db.execute(
                    f"SELECT text_sha256, embedding FROM passages WHERE text_sha256 IN ({','.join('?' * len(batch))})",
                    batch,
                )
                found.update((digest, np.frombuffer(blob, dtype=np.float32)) for digest, blob in rows)
        return found

    def _write(
        self, documents: Sequence[Document], chunks: dict[str, list[Chunk]], vectors: dict[str, np.ndarray]
    ) -> tuple[list[int], list[tuple[int, np.ndarray]]]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = self._delete_rows([d.id for d in documents])
            added: list[tuple[int, np.ndarray]] = []
            for document in documents:
                db.execute(
                    "INSERT INTO documents (id, title, metadata, chars, text_sha256) VALUES (?, ?, ?, ?, ?)",
                    (
                        document.id,
                        document.title,
                        json.dumps(dict(document.metadata)),
                        len(document.text),
                        sha256(document.text),
                    ),
                )
                for chunk in chunks[document.id]:
                    vector = vectors[sha256(chunk.text)]
                    cursor = db.execute(
                        "INSERT INTO passages (document_id, idx, text, start, end, text_sha256, embedding) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            document.id,
                            chunk.index,
                            chunk.text,
                            chunk.start,
                            chunk.end,
                            sha256(chunk.text),
                            vector.astype(np.float32).tobytes(),
                        ),
                    )
                    passage_id = int(cursor.lastrowid or 0)
                    db.execute("INSERT INTO passages_fts (rowid, text) VALUES (?, ?)", (passage_id, chunk.text))
                    added.append((passage_id, vector))
            self._touch()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return removed, added

    def _delete_rows(self, document_ids: Sequence[str]) -> list[int]:
        """Delete documents and their passages inside the caller's transaction; return the passage ids removed."""
        removed: list[int] = []
        for batch in _batches(document_ids):
            marks = ",".join("?" * len(batch))
            ids = [r[0] for r in self._db.execute(f"SELECT id FROM passages WHERE document_id IN ({marks})", batch)]
            for id_batch in _batches(ids):
                id_marks = ",".join("?" * len(id_batch))
                self._db.execute(f"DELETE FROM passages_fts WHERE rowid IN ({id_marks})", id_batch)
                self._db.execute(f"DELETE FROM passages WHERE id IN ({id_marks})", id_batch)
            self._db.execute(f"DELETE FROM documents WHERE id IN ({marks})", batch)
            removed += ids
        return removed

    def _touch(self) -> None:
        now = str(time.time())
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'updated'", (now,))
        self.meta["updated"] = now

    def delete(self, document_ids: Sequence[str]) -> tuple[int, list[str]]:
        """Remove documents; return how many were removed and the ids that were not there."""
        wanted = list(dict.fromkeys(document_ids))
        with self._lock:
            self._require_open()
            present = set()
            for batch in _batches(wanted):
                marks = ",".join("?" * len(batch))
                present |= {r[0] for r in self._db.execute(f"SELECT id FROM documents WHERE id IN ({marks})", batch)}
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = self._delete_rows(sorted(present))
                self._touch()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._update_index(removed, [])
        return len(present), [i for i in wanted if i not in present]

    # ---- reading ----------------------------------------------------------------------------------------------

    def index(self) -> VectorIndex:
        """The vectors, read from the database on first use."""
        with self._lock:
            self._require_open()
            if self._index is None:
                rows = self._db.execute("SELECT id, embedding FROM passages ORDER BY id").fetchall()
                dimensions = int(self.meta["dimensions"])
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = (
                    np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dimensions)
                    if rows
                    else np.zeros((0, dimensions), dtype=np.float32)
                )
                self._index = VectorIndex(ids, vectors)
            return self._index

    def _update_index(self, removed: list[int], added: list[tuple[int, np.ndarray]]) -> None:
        """Apply a committed write to the in-memory vectors (new passage ids are larger than every existing one)."""
        if self._index is None:
            return
        keep = ~np.isin(self._index.ids, np.asarray(removed, dtype=np.int64)) if removed else slice(None)
        ids, vectors = self._index.ids[keep], self._index.vectors[keep]
        if added:
            ids = np.concatenate([ids, np.array([i for i, _ in added], dtype=np.int64)])
            vectors = np.concatenate([vectors, np.stack([v for _, v in added]).astype(np.float32)])
        self._index = VectorIndex(ids, vectors)

    def keyword_search(self, match: str, limit: int) -> list[tuple[int, float]]:
        """(passage id, BM25 score) best first, for an FTS5 query; BM25 here is higher-is-better."""
        with self._lock:
            self._require_open()
            rows = self._db.execute(
                "SELECT rowid, bm25(passages_fts) FROM passages_fts WHERE passages_fts MATCH ? "
                "ORDER BY bm25(passages_fts) LIMIT ?",
                (match, limit),
            ).fetchall()
        return [(int(rowid), -float(score)) for rowid, score in rows]

    def passages(self, passage_ids: Sequence[int]) -> dict[int, StoredPassage]:
        found: dict[int, StoredPassage] = {}
        with self._lock:
            self._require_open()
            for batch in _batches(list(passage_ids)):
                rows = self._db.execute(
                    "SELECT p.id, p.document_id, d.title, d.metadata, p.idx, p.text, p.start, p.end "
                    "FROM passages p JOIN documents d ON d.id = p.document_id "
                    f"WHERE p.id IN ({','.join('?' * len(batch))})",
                    batch,
                )
                for pid, doc, title, metadata, idx, text, start, end in rows:
                    found[pid] = StoredPassage(pid, doc, title, json.loads(metadata), idx, text, start, end)
        return found

    def info(self, identity: str) -> CollectionInfo:
        with self._lock:
            self._require_open()
            documents = self._db.execute("SELECT count(*) FROM documents").fetchone()[0]
            passages = self._db.execute("SELECT count(*) FROM passages").fetchone()[0]
        size = 0
        if self.path is not None:
            size = sum(p.stat().st_size for p in _files(self.path) if p.exists())
        return CollectionInfo(
            name=self.name,
            documents=documents,
            passages=passages,
            embedding_model=self.embedding_model,
            compatible=self.embedding_model == identity,
            size_bytes=size,
            created=float(self.meta["created"]),
            updated=float(self.meta["updated"]),
        )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._index = None
                self._db.close()


def _files(path: Path) -> list[Path]:
    """The database file and its write-ahead log and shared-memory files."""
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


class CollectionStore:
    """The collections under one folder, opened on first use and kept open."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self._creating = threading.Lock()  # one creation at a time, so two creators of a name cannot race
        if root.is_dir():
            remove_abandoned(root, CREATING)

    def _path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name.removesuffix(SUFFIX) for p in self.root.glob(f"*{SUFFIX}") if p.is_file() and p.name[0] != "."
        )

    def get(self, name: str, create_for: tuple[str, int] | None = None) -> Collection:
        """The collection; with create_for=(embedding model identity, dimensions), created empty when it is missing
        (UpsertDocuments creates collections with their first documents instead: see upsert)."""
        with self._lock:
            collection = self._open.get(name)
            if collection is not None:
                return collection
            path = self._path(name)
            if not path.is_file():
                if create_for is None:
                    known = ", ".join(self.names()) or "none"
                    raise NotFound(f"collection: no collection {name!r} (collections: {known})")
                self.root.mkdir(parents=True, exist_ok=True)
            identity, dimensions = create_for or ("", 0)
            collection = Collection(name, path, identity, dimensions)
            self._open[name] = collection
            return collection

    def upsert(
        self, name: str, documents: Sequence[Document], embedder: Embeds, dimensions: int, chars: int, overlap: int
    ) -> tuple[UpsertOutcome, Collection]:
        """Upsert into the collection, creating it (with these documents in it) when it does not exist."""
        if not self._path(name).is_file():
            with self._creating:
                if not self._path(name).is_file():  # no other request created it meanwhile
                    return self._create(name, documents, embedder, dimensions, chars, overlap)
        collection = self.get(name)
        return collection.upsert(documents, embedder, chars, overlap), collection

    def _create(
        self, name: str, documents: Sequence[Document], embedder: Embeds, dimensions: int, chars: int, overlap: int
    ) -> tuple[UpsertOutcome, Collection]:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{staging_prefix(CREATING)}{name}{SUFFIX}"
        building = Collection(name, staging, embedder.identity, dimensions)
        try:
            outcome = building.upsert(documents, embedder, chars, overlap)
        except BaseException:
            building.close()
            for path in _files(staging):
                path.unlink(missing_ok=True)
            raise
        building.close()  # the last connection's close folds the write-ahead log into the one file
        os.rename(staging, self._path(name))
        sync_folder(self.root)
        return outcome, self.get(name)

    def drop(self, name: str) -> None:
        collection = self.get(name)
        with self._lock:
            self._open.pop(name, None)
            collection.close()
            for path in _files(self._path(name)):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for collection in self._open.values():
                collection.close()
            self._open.clear()
