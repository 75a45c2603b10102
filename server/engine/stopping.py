"""Stop sequences: find the earliest one in generated text, and how much text must be held back while streaming so
that a stop sequence arriving over several tokens is never half-sent."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    """A stop sequence found in the text: where the text ends because of it."""

    sequence: str
    start: int
    end: int  # where the output text is cut: after the sequence when it is included, before it otherwise


class StopSequenceMatcher:
    """Searches text for any of a request's stop sequences."""

    def __init__(self, sequences: tuple[str, ...], include: bool) -> None:
        self._sequences = sequences
        self._include = include
        # A suffix this long could be the start of a stop sequence that the next token completes.
        self.holdback = max((len(s) for s in sequences), default=1) - 1

    def find(self, text: str, new_from: int) -> StopMatch | None:
        """The earliest stop sequence in text that overlaps the new part text[new_from:], if any."""
        start = max(0, new_from - self.holdback)
        best: StopMatch | None = None
        for sequence in self._sequences:
            index = text.find(sequence, start)
            if index >= 0 and (best is None or index < best.start):
                end = index + len(sequence) if self._include else index
                best = StopMatch(sequence=sequence, start=index, end=end)
        return best
