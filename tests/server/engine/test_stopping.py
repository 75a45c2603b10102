"""Stop sequence matching and the streaming hold-back."""

from __future__ import annotations

from loraserve.server.engine.stopping import StopSequenceMatcher


def test_finds_the_earliest_stop_sequence_in_the_new_text() -> None:
    matcher = StopSequenceMatcher(("END", "\n\n"), include=False)
    match = matcher.find("line one\n\nmore END", new_from=5)
    assert match is not None and match.sequence == "\n\n" and match.end == 8


def test_a_sequence_completed_across_tokens_is_found() -> None:
    matcher = StopSequenceMatcher(("###",), include=True)
    assert matcher.find("answer #", new_from=7) is None
    match = matcher.find("answer ###", new_from=8)
    assert match is not None and match.start == 7 and match.end == 10


def test_old_text_is_not_searched_again() -> None:
    matcher = StopSequenceMatcher(("ab",), include=False)
    assert matcher.find("ab and more text", new_from=10) is None


def test_holdback_is_one_less_than_the_longest_sequence() -> None:
    assert StopSequenceMatcher(("a", "abcd"), include=False).holdback == 3
    assert StopSequenceMatcher((), include=False).holdback == 0
