"""Training data: read the conversation formats people have, check every record, and say exactly why a record is
rejected.

Formats (detected from the records, and reported):
  messages          {"messages": [{"role": "user" | "assistant" | "system", "content": ...}, ...]}  (OpenAI / TRL)
  sharegpt          {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}
  human-assistant   {"text": "### Human: ... ### Assistant: ... ### Human: ..."}  (the Flask prototype's
                    claude4_style_data.json; text before the first tag is a system message)
Files are a JSON array of records or JSON Lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraserve.prompting import ASSISTANT_TAG, HUMAN_TAG, Message

FORMATS = ("messages", "sharegpt", "human-assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
}
_TAG = re.compile(rf"({re.escape(HUMAN_TAG)}|{re.escape(ASSISTANT_TAG)})")


class DataError(ValueError):
    """The file as a whole cannot be used (unreadable, or in no known format)."""


@dataclass(frozen=True)
class Rejection:
    """Why one record is not used: its index in the file, the field at fault, and the reason."""

    index: int
    field: str
    reason: str
    record: Any = None


@dataclass(frozen=True)
class Conversation:
    index: int
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Rules:
    """Optional bounds on a conversation: user+assistant turns, and characters of content (0 = no bound)."""

    min_turns: int = 0
    max_turns: int = 0
    min_chars: int = 0
    max_chars: int = 0


@dataclass
class Parsed:
    """A file's records sorted into usable conversations and rejections."""

    format: str
    total: int
    conversations: list[Conversation] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def read_records(path: Path) -> list[Any]:
    """The records of a JSON array or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot be read: {error}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON: {error}") from None
        return list(records)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not valid JSON: {error}") from None
    return records


def detect_format(records: list[Any]) -> str:
    """The format of the first record that is an object."""
    for record in records:
        if not isinstance(record, dict):
            continue
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if isinstance(record.get("text"), str) and HUMAN_TAG in record["text"]:
            return "human-assistant"
        raise DataError(
            f"unknown record layout with keys {sorted(record)}: expected 'messages' (OpenAI/TRL), 'conversations' "
            f"(ShareGPT), or 'text' with '{HUMAN_TAG} ... {ASSISTANT_TAG} ...'"
        )
    raise DataError("no records: the file holds no JSON objects")


def _from_messages(record: dict) -> tuple[Message, ...] | Rejection:
    turns = record.get("messages")
    if not isinstance(turns, list):
        return Rejection(-1, "messages", "must be a list of {role, content} objects")
    messages = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            return Rejection(-1, f"messages[{i}]", "must be an object with string 'role' and 'content'")
        messages.append(Message(turn["role"], turn["content"]))
    return tuple(messages)


def _from_sharegpt(record: dict) -> tuple[Message, ...] | Rejection:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return Rejection(-1, "conversations", "must be a list of {from, value} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return Rejection(-1, f"conversations[{i}]", "must be an object with a string 'value'")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            return Rejection(-1, f"conversations[{i}].from", f"unknown speaker {turn.get('from')!r}")
        messages.append(Message(role, turn["value"]))
    return tuple(messages)


def _from_human_assistant(record: dict) -> tuple[Message, ...] | Rejection:
    text = record.get("text")
    if not isinstance(text, str):
        return Rejection(-1, "text", "must be a string")
    pieces = _TAG.split(text)
    messages = [Message("system", pieces[0].strip())] if pieces[0].strip() else []
    for tag, content in zip(pieces[1::2], pieces[2::2], strict=True):
        messages.append(Message("user" if tag == HUMAN_TAG else "assistant", content.strip()))
    return tuple(messages)


_PARSERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "human-assistant": _from_human_assistant}


def check(messages: tuple[Message, ...], rules: Rules) -> tuple[str, str] | None:
    """(field, reason) for the first problem of a conversation, or None."""
    turns = [m for m in messages if m.role != "system"]
    if messages and messages[0].role == "system" and not messages[0].content.strip():
        return "messages[0].content", "empty system message"
    if any(m.role == "system" for m in messages[1:]):
        return "messages", "a system message may only come first"
    if not turns:
        return "messages", "no user or assistant turns"
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            return (
                f"messages[{i + offset}].role",
                f"expected {expected} (turns alternate user, assistant), got {message.role}",
            )
        if not message.content.strip():
            return f"messages[{i + offset}].content", "empty turn"
    if turns[-1].role != "assistant":
        return f"messages[{len(messages) - 1}]", "the last turn must be the assistant's"
    chars = sum(len(m.content) for m in messages)
    bounds = [
        (
            rules.min_turns and len(turns) < rules.min_turns,
            f"{len(turns)} turns, fewer than min_turns={rules.min_turns}",
        ),
        (
            rules.max_turns and len(turns) > rules.max_turns,
            f"{len(turns)} turns, more than max_turns={rules.max_turns}",
        ),
        (rules.min_chars and chars < rules.min_chars, f"{chars} characters, fewer than min_chars={rules.min_chars}"),
        (rules.max_chars and chars > rules.max_chars, f"{chars} characters, more than max_chars={rules.max_chars}"),
    ]
    for failed, reason in bounds:
        if failed:
            return "messages", reason
    return None


def _normalised(messages: Iterable[Message]) -> str:
    return json.dumps([(m.role, " ".join(m.content.split())) for m in messages])


def parse(records: list[Any], rules: Rules) -> Parsed:
    """Detect the format, parse and check every record, and drop exact duplicates (whitespace normalised)."""
    fmt = detect_format(records)
    parsed = Parsed(format=fmt, total=len(records))
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            parsed.rejections.append(Rejection(index, "record", "not a JSON object", record))
            continue
        messages = _PARSERS[fmt](record)
        if isinstance(messages, Rejection):
            parsed.rejections.append(Rejection(index, messages.field, messages.reason, record))
            continue
        problem = check(messages, rules)
        if problem is not None:
            parsed.rejections.append(Rejection(index, problem[0], problem[1], record))
            continue
        key = _normalised(messages)
        if key in first_seen:
            parsed.rejections.append(Rejection(index, "record", f"exact duplicate of record {first_seen[key]}", record))
            continue
        first_seen[key] = index
        parsed.conversations.append(Conversation(index, messages))
    return parsed


def write_rejections(path: Path, rejections: list[Rejection]) -> None:
    """One JSON line per rejected record: index, field, reason and the record itself."""
    with path.open("w", encoding="utf-8") as out:
        for r in rejections:
            out.write(
                json.dumps(
                    {"index": r.index, "field": r.field, "reason": r.reason, "record": r.record}, ensure_ascii=False
                )
                + "\n"
            )
