"""Incremental detokenization on the real SmolLM2 tokenizer: deltas never split a UTF-8 character and add up to
the text of all the tokens."""

from __future__ import annotations

import pytest

from loraserve.server.engine.detokenizer import REPLACEMENT_CHARACTER, IncrementalDetokenizer

TEXTS = [
    "Plain ASCII, with punctuation!",
    "Café, naïve, Ærøskøbing — “quotes”",
    "日本語のテキストと中文字符",
    "Emoji 🤖🚀 and family 👨‍👩‍👧 in one line",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_add_up(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    decode = lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=True)  # noqa: E731
    detokenizer = IncrementalDetokenizer(decode, context_ids=tokenizer.encode("Say:", add_special_tokens=False))
    deltas = [detokenizer.push(token_id) for token_id in ids]
    deltas.append(detokenizer.flush())
    assert all(REPLACEMENT_CHARACTER not in delta for delta in deltas)
    assert "".join(deltas) == text
    splits_characters = any(REPLACEMENT_CHARACTER in tokenizer.decode([i]) for i in ids)
    if splits_characters:  # a token that ends inside a character makes its delta wait for the next token
        assert "" in deltas[:-1]
    if "🤖" in text:  # make sure the split case really is exercised
        assert splits_characters


def test_flush_returns_an_incomplete_character_as_replacement(tokenizer) -> None:
    ids = tokenizer.encode("🤖", add_special_tokens=False)
    assert len(ids) > 1, "the test needs a character split over tokens"
    decode = lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=True)  # noqa: E731
    detokenizer = IncrementalDetokenizer(decode)
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() == REPLACEMENT_CHARACTER
