"""`loraserve data validate` (and the start of `train`): parse and check every record, tokenize with the real
tokenizer, and report what is usable, what is not and why, and how long the sequences are."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import quantiles
from typing import Any

from loraserve.prompting import Message, PromptFormat
from loraserve.trainer.data import Parsed, Rejection, Rules, parse, read_records
from loraserve.trainer.examples import Example, LabelError, build_example


@dataclass
class Report:
    """What validation found. `examples` are the records to train on, in file order."""

    path: str
    format: str
    total: int
    examples: list[Example] = field(default_factory=list)
    example_indices: list[int] = field(default_factory=list)  # each example's record index in the file
    conversations: list[tuple[Message, ...]] = field(default_factory=list)  # each example's conversation
    rejections: list[Rejection] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    max_length: int = 0
    too_long: str = "drop"
    truncated: int = 0
    dropped_too_long: int = 0

    @property
    def valid(self) -> int:
        return len(self.examples)

    @property
    def error_rate(self) -> float:
        return len(self.rejections) / self.total if self.total else 1.0

    def percentiles(self) -> dict[str, int]:
        counts = sorted(self.token_counts)
        if not counts:
            return {}
        cuts = quantiles(counts, n=100, method="inclusive") if len(counts) > 1 else [counts[0]] * 99
        return {
            "min": counts[0],
            "p50": round(cuts[49]),
            "p90": round(cuts[89]),
            "p99": round(cuts[98]),
            "max": counts[-1],
        }

    def summary(self) -> str:
        """A table for people."""
        reasons: dict[str, int] = {}
        for r in self.rejections:
            key = r.reason if not r.reason.startswith("exact duplicate") else "exact duplicate"
            reasons[key] = reasons.get(key, 0) + 1
        lines = [
            f"file          {self.path}",
            f"format        {self.format}",
            f"records       {self.total}",
            f"valid         {self.valid}",
            f"rejected      {len(self.rejections)} ({self.error_rate:.0%})",
        ]
        lines += [f"  {count:>5} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
        stats = self.percentiles()
        if stats:
            lines.append("tokens        " + "  ".join(f"{k} {v}" for k, v in stats.items()))
        over = sum(count > self.max_length for count in self.token_counts)
        lines.append(
            f"over {self.max_length:<8} {over} (too_long={self.too_long}: {self.truncated} truncated, "
            f"{self.dropped_too_long} dropped)"
        )
        return "\n".join(lines)


def validate(
    path: Path,
    tokenizer: Any,
    prompt_format: PromptFormat,
    rules: Rules,
    max_length: int,
    too_long: str,
    train_on_all: bool = False,
) -> Report:
    parsed: Parsed = parse(read_records(path), rules)
    report = Report(
        path=str(path),
        format=parsed.format,
        total=parsed.total,
        rejections=list(parsed.rejections),
        max_length=max_length,
        too_long=too_long,
    )
    eos_id = tokenizer.eos_token_id
    for conversation in parsed.conversations:
        try:
            example, count, action = build_example(
                conversation.messages, tokenizer, prompt_format, eos_id, max_length, too_long, train_on_all
            )
        except LabelError as error:
            report.rejections.append(Rejection(conversation.index, "messages", str(error)))
            continue
        report.token_counts.append(count)
        if example is None:
            report.dropped_too_long += 1
            report.rejections.append(
                Rejection(
                    conversation.index, "messages", f"{count} tokens, more than max_length={max_length} (dropped)"
                )
            )
            continue
        report.truncated += action == "truncated"
        report.examples.append(example)
        report.example_indices.append(conversation.index)
        report.conversations.append(conversation.messages)
    report.rejections.sort(key=lambda r: r.index)
    return report
