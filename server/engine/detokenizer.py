"""Incremental detokenization: token ids in, text deltas out, never ending inside a UTF-8 character.

The technique is TGI's (text-generation-inference `decode_token`): decode a short window twice, with and without the
newest token, and emit the difference once it no longer ends in U+FFFD (an incomplete byte sequence). A few prompt
tokens seed the window so that tokenizers which drop a word's leading space at the start of a text (SentencePiece)
still produce it for the first generated word.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CONTEXT_TOKENS = 5
REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Feeds one token at a time; returns the text that became final with it."""

    def __init__(self, decode: Callable[[list[int]], str], context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add a token; return the new text, or "" while it ends inside a multi-byte character."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHARACTER):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back (a character the output ended inside of shows as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix_text) :]
