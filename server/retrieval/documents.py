"""The caller's documents, and the checks every path that takes them (RagQuery, UpsertDocuments) applies."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from loraserve.errors import InvalidRequest

# Collection names become file names: a letter or digit first, then letters, digits, _ . - (no path separators).
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_DOCUMENT_ID_CHARS = 256


@dataclass(frozen=True)
class Document:
    """A caller's document."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


def check_documents(
    documents: Sequence[Document], max_documents: int, max_chars: int, field: str, max_total_chars: int = 0
) -> None:
    """INVALID_ARGUMENT naming the first document that breaks a rule: too many, an empty or repeated id, an empty
    or too long text; or all the texts together longer than max_total_chars (0: no bound beyond each text's), which
    bounds the embedding work one request brings."""
    if len(documents) > max_documents:
        raise InvalidRequest(f"at most {max_documents} documents are allowed, got {len(documents)}", field)
    total = sum(len(d.text) for d in documents)
    if max_total_chars and total > max_total_chars:
        raise InvalidRequest(
            f"have {total} characters of text together; at most {max_total_chars} are allowed in one request (the "
            "server's --max-request-document-chars): send fewer or shorter documents",
            field,
        )
    seen: set[str] = set()
    for i, document in enumerate(documents):
        where = f"{field}[{i}]"
        if not document.id:
            raise InvalidRequest("must not be empty", f"{where}.id")
        if len(document.id) > MAX_DOCUMENT_ID_CHARS:
            raise InvalidRequest(f"must be at most {MAX_DOCUMENT_ID_CHARS} characters", f"{where}.id")
        if document.id in seen:
            raise InvalidRequest(f"{document.id!r} is used by an earlier document; ids must be unique", f"{where}.id")
        seen.add(document.id)
        if not document.text.strip():
            raise InvalidRequest("must not be empty", f"{where}.text")
        if len(document.text) > max_chars:
            raise InvalidRequest(
                f"has {len(document.text)} characters; at most {max_chars} are allowed (split the document)",
                f"{where}.text",
            )


def check_collection_name(name: str, field: str = "collection") -> None:
    if not COLLECTION_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{name!r} is not a collection name: 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit",
            field,
        )
