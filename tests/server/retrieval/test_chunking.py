"""Documents into passages: paragraphs whole when they fit, long ones split at sentence boundaries with overlap,
over-long sentences cut at words (or characters), and every passage located exactly in the document's text."""

from __future__ import annotations

import itertools

import pytest

from loraserve.server.retrieval.chunking import Chunk, sentence_spans, split_passages


def located(text: str, chunks: list[Chunk]) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text and chunk.text == chunk.text.strip() and chunk.text


@pytest.mark.parametrize("text", ["", "   ", "\n\n \n\t\n"])
def test_blank_text_has_no_passages(text: str) -> None:
    assert split_passages(text) == []


def test_paragraphs_that_fit_are_passages_of_their_own() -> None:
    text = "  First paragraph.\nStill the first.\n\n\n   Second one!  \n \nThird?"
    chunks = split_passages(text, max_chars=100, overlap_chars=20)
    assert [c.text for c in chunks] == ["First paragraph.\nStill the first.", "Second one!", "Third?"]
    located(text, chunks)


def test_a_long_paragraph_splits_at_sentences_with_overlap() -> None:
    sentences = [f"Sentence number {i} says something." for i in range(40)]
    text = "Intro.\n\n" + " ".join(sentences)
    chunks = split_passages(text, max_chars=200, overlap_chars=80)
    located(text, chunks)
    assert chunks[0].text == "Intro."
    body = chunks[1:]
    assert len(body) > 1 and all(len(c.text) <= 200 for c in body)
    for chunk in body:  # whole sentences only
        assert chunk.text.startswith("Sentence number") and chunk.text.endswith("something.")
    for previous, following in itertools.pairwise(body):
        assert following.start < previous.end  # consecutive passages share text
        assert previous.end - following.start <= 80
    covered = "".join(text[c.start : c.end] for c in body)
    assert all(s in covered for s in sentences)  # nothing is lost


def test_one_huge_paragraph_without_sentence_ends_is_cut_at_words() -> None:
    words = [f"word{i}" for i in range(1000)]
    text = " ".join(words)
    chunks = split_passages(text, max_chars=300, overlap_chars=50)
    located(text, chunks)
    assert len(chunks) > 10 and all(len(c.text) <= 300 for c in chunks)
    assert all(c.text.split()[0] in words and c.text.split()[-1] in words for c in chunks)  # no word cut in two
    assert chunks[0].text.startswith("word0 ") and chunks[-1].text.endswith("word999")


def test_unicode_without_spaces_is_cut_at_characters_and_full_stops() -> None:
    sentence = "这是一个很长的句子，没有空格"  # no full stop: one sentence of 14 characters
    unbroken = sentence * 40
    chunks = split_passages(unbroken, max_chars=100, overlap_chars=20)
    located(unbroken, chunks)
    assert all(len(c.text) <= 100 for c in chunks) and "".join(c.text for c in chunks).count("这") >= 40
    stops = "第一句。第二句！第三句？" * 30
    chunks = split_passages(stops, max_chars=60, overlap_chars=10)
    located(stops, chunks)
    assert all(c.text.endswith(("。", "！", "？")) for c in chunks)


def test_emoji_and_accents_keep_their_offsets() -> None:
    text = "Café crème 🍰 is sweet. Noël à Zürich ❄️ is cold.\n\nÅngström 🚀!"
    chunks = split_passages(text, max_chars=30, overlap_chars=0)
    located(text, chunks)
    assert [c.text for c in chunks] == ["Café crème 🍰 is sweet.", "Noël à Zürich ❄️ is cold.", "Ångström 🚀!"]


def test_sentence_spans_cover_quotes_and_missing_spaces() -> None:
    text = 'He said "stop." Then left. Really?Yes. 好。好！'
    expected = ['He said "stop."', "Then left.", "Really?Yes.", "好。", "好！"]
    assert [text[s:e] for s, e in sentence_spans(text)] == expected
