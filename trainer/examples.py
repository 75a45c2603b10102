"""Conversations to training examples: token ids and labels, rendered with the shared prompt format.

Labels learn the assistant turns only (by default): each assistant turn's tokens up to and including its EOS token,
which must be there, since it is what teaches the adapter to stop. Everything else is -100. Prompts are tokenized the
way the server tokenizes them, so the adapter learns from exactly the text it will be served with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraserve.prompting import Message, PromptFormat

IGNORE = -100
TOO_LONG_ACTIONS = ("drop", "truncate", "error")


@dataclass(frozen=True)
class Example:
    """One training sequence: input ids and labels of the same length (-100 where nothing is learned)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def learned_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class LabelError(ValueError):
    """A conversation cannot be turned into a sequence that teaches the model to stop."""


def _segment_parts(
    messages: tuple[Message, ...], tokenizer: Any, prompt_format: PromptFormat, eos_id: int, train_on_all: bool
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per segment of the rendered conversation."""
    parts = []
    for i, segment in enumerate(prompt_format.segments(messages)):
        ids = list(tokenizer.encode(segment.text, add_special_tokens=i == 0 and prompt_format.adds_special_tokens))
        if segment.assistant:
            if eos_id not in ids:
                raise LabelError(
                    f"the {prompt_format.name} prompt format does not end an assistant turn with the EOS token "
                    f"(id {eos_id}), so the model would never learn to stop"
                )
            end = ids.index(eos_id) + 1
            labels = ids[:end] + [IGNORE] * (len(ids) - end)
        else:
            labels = list(ids) if train_on_all else [IGNORE] * len(ids)
        parts.append((ids, labels))
    return parts


def build_example(
    messages: tuple[Message, ...],
    tokenizer: Any,
    prompt_format: PromptFormat,
    eos_id: int,
    max_length: int,
    too_long: str,
    train_on_all: bool = False,
) -> tuple[Example | None, int, str]:
    """The example (None when dropped), the conversation's full token count, and what was done about its length:
    "", "dropped" or "truncated". Truncation keeps the longest run of whole turns that fits; error raises."""
    parts = _segment_parts(messages, tokenizer, prompt_format, eos_id, train_on_all)
    total = sum(len(ids) for ids, _ in parts)
    if total <= max_length:
        return _join(parts), total, ""
    if too_long == "error":
        raise LabelError(f"{total} tokens, more than max_length={max_length} (and too_long=error)")
    if too_long == "truncate":
        kept: list[tuple[list[int], list[int]]] = []
        length = 0
        for ids, labels in parts:
            if length + len(ids) > max_length:
                break
            kept.append((ids, labels))
            length += len(ids)
        # Cut after a turn that is learned: a sequence that ends in a prompt teaches nothing more.
        while kept and all(label == IGNORE for label in kept[-1][1]):
            kept.pop()
        if kept:
            return _join(kept), total, "truncated"
    return None, total, "dropped"


def _join(parts: list[tuple[list[int], list[int]]]) -> Example:
    ids = [token for part_ids, _ in parts for token in part_ids]
    labels = [label for _, part_labels in parts for label in part_labels]
    return Example(input_ids=ids, labels=labels)
