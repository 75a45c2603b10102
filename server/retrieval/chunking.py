"""Documents into passages, the unit retrieval scores and the model reads.

A paragraph (text between blank lines) is one passage when it fits in `max_chars`. A longer paragraph is split into
passages of whole sentences, consecutive ones sharing up to `overlap_chars` of trailing sentences so that a fact
spanning a cut is whole in one of them. A single sentence longer than `max_chars` is cut at word boundaries (or at
characters, for scripts written without spaces). Every passage records where it lies in the document's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAGRAPH = re.compile(r"\S(?:.*?\S)?(?=\s*\n\s*\n|\s*$)", re.DOTALL)
# A sentence ends at . ! ? and any closing quotes or brackets, followed by space; the full-width stops of CJK text
# (U+3002, U+FF01, U+FF1F) end one even without a space.
FULL_STOPS = "\u3002\uff01\uff1f"
CLOSERS = "\"')\\]\u201d\u2019\u300d\u300f"
_SENTENCE_END = re.compile(rf"[.!?]+[{CLOSERS}]*(?=\s)|[{FULL_STOPS}]+[{CLOSERS}]*")


@dataclass(frozen=True)
class Chunk:
    """A passage: text == document_text[start:end]."""

    index: int
    text: str
    start: int
    end: int


def _paragraphs(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _PARAGRAPH.finditer(text)]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The sentence spans of text[start:end], whitespace-trimmed, covering all of its non-space text."""
    spans: list[tuple[int, int]] = []
    cursor = start
    for match in _SENTENCE_END.finditer(text, start, end):
        spans.append((cursor, match.end()))
        cursor = match.end()
    spans.append((cursor, end))
    return [trimmed for s, e in spans if (trimmed := _trim(text, s, e))[0] < trimmed[1]]


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _cut_long(text: str, start: int, end: int, max_chars: int, overlap_chars: int) -> list[tuple[int, int]]:
    """Windows of at most max_chars over one over-long sentence, cut at the last space inside each window when there
    is one, each starting up to overlap_chars before the previous window's end."""
    windows: list[tuple[int, int]] = []
    position = start
    while True:
        if end - position <= max_chars:
            windows.append(_trim(text, position, end))
            return windows
        limit = position + max_chars
        space = text.rfind(" ", position + max_chars // 2, limit)
        cut = space if space > position else limit
        windows.append(_trim(text, position, cut))
        next_start = max(cut - overlap_chars, position + 1)
        if overlap_chars and (space_after := text.find(" ", next_start, cut)) != -1:
            next_start = space_after  # start the overlap at a word boundary
        position = _trim(text, next_start, end)[0]


def _pack(sentences: list[tuple[int, int]], max_chars: int, overlap_chars: int) -> list[tuple[int, int]]:
    """Greedy runs of whole sentences of at most max_chars; each run after the first repeats the previous run's
    last sentences that fit in overlap_chars (never the whole previous run, so every run adds new text)."""
    runs: list[tuple[int, int]] = []
    first = 0
    while first < len(sentences):
        last = first
        while last + 1 < len(sentences) and sentences[last + 1][1] - sentences[first][0] <= max_chars:
            last += 1
        runs.append((sentences[first][0], sentences[last][1]))
        if last + 1 == len(sentences):
            break
        overlap_first = last + 1
        while (
            overlap_first - 1 > first
            and sentences[last][1] - sentences[overlap_first - 1][0] <= overlap_chars
            and sentences[last + 1][1] - sentences[overlap_first - 1][0] <= max_chars
        ):
            overlap_first -= 1
        first = overlap_first
    return runs


def split_passages(text: str, max_chars: int = 800, overlap_chars: int = 150) -> list[Chunk]:
    """The passages of a document's text, in order; none for blank text."""
    spans: list[tuple[int, int]] = []
    for start, end in _paragraphs(text):
        if end - start <= max_chars:
            spans.append((start, end))
            continue
        units: list[tuple[int, int]] = []
        for s, e in _sentences(text, start, end):
            units += [(s, e)] if e - s <= max_chars else _cut_long(text, s, e, max_chars, overlap_chars)
        spans += _pack(units, max_chars, overlap_chars)
    return [Chunk(i, text[s:e], s, e) for i, (s, e) in enumerate(spans)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Where a text's sentences are (used to attribute an answer's sentences to passages)."""
    return _sentences(text, 0, len(text))
