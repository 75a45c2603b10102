"""Honest citations: every [n] in an answer names a passage the model was given, and each source says whether the
answer cites it.

The model's own markers are kept when they name a listed passage and removed when they do not (a small model will
cite [7] of three). A sentence the model left without a marker is attributed to a passage only when the passage
supports it on its face: every number in the sentence appears in the passage, at least half of the sentence's
content words do, and the two are similar in meaning (embedding cosine >= ATTRIBUTION_SIMILARITY); among such
passages the most similar wins. Similarity alone would cite a passage for any sentence on its topic, wrong numbers
included. A sentence no passage supports stays uncited.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loraserve.server.retrieval.chunking import CLOSERS, FULL_STOPS, sentence_spans
from loraserve.server.retrieval.stopwords import STOPWORDS

ATTRIBUTION_SIMILARITY = 0.5
MIN_WORD_OVERLAP = 0.5
_MARKER = re.compile(r"\s?\[(\d+(?:\s*,\s*\d+)*)\]")
_TRAILING_PUNCTUATION = re.compile(rf"[.!?:;{FULL_STOPS}]+[{CLOSERS}]*$")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class CitedAnswer:
    text: str
    cited: frozenset[int]  # passage numbers (1-based) the text cites


def _keep_valid_markers(text: str, count: int) -> tuple[str, set[int]]:
    cited: set[int] = set()

    def rewrite(match: re.Match[str]) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", match[1])]
        valid = list(dict.fromkeys(n for n in numbers if 1 <= n <= count))
        cited.update(valid)
        if not valid:
            return ""
        space = " " if match[0].startswith((" ", "\n", "\t")) else ""
        return f"{space}[{', '.join(map(str, valid))}]"

    return _MARKER.sub(rewrite, text), cited


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def supports(passage: str, sentence: str) -> bool:
    """Whether the passage holds the sentence's numbers and at least half of its content words."""
    words = _content_words(sentence)
    if not words:
        return False
    available = _content_words(passage)
    if any(ch.isdigit() for w in words - available for ch in w):
        return False
    return len(words & available) >= MIN_WORD_OVERLAP * len(words)


def cite(
    text: str,
    passages: Sequence[str],
    passage_vectors: np.ndarray,
    embed: Callable[[Sequence[str]], np.ndarray],
) -> CitedAnswer:
    """The answer with valid citations only, and sentences the model left uncited attributed where a passage
    supports them."""
    text, cited = _keep_valid_markers(text, len(passages))
    spans = [(s, e) for s, e in sentence_spans(text) if not _MARKER.search(text, s, e)]
    supported = [[supports(p, text[s:e]) for p in passages] for s, e in spans]
    wanted = [i for i, row in enumerate(supported) if any(row)]
    if not wanted:
        return CitedAnswer(text, frozenset(cited))
    similarities = embed([text[spans[i][0] : spans[i][1]] for i in wanted]) @ passage_vectors.T  # [S, P]
    insertions: list[tuple[int, str]] = []
    for i, row in zip(wanted, similarities, strict=True):
        row = np.where(supported[i], row, -np.inf)
        best = int(np.argmax(row))
        if row[best] < ATTRIBUTION_SIMILARITY:
            continue
        start, end = spans[i]
        punctuation = _TRAILING_PUNCTUATION.search(text, start, end)
        insertions.append((punctuation.start() if punctuation else end, f" [{best + 1}]"))
        cited.add(best + 1)
    for position, marker in sorted(insertions, reverse=True):
        text = text[:position] + marker + text[position:]
    return CitedAnswer(text, frozenset(cited))
