"""Reading and checking training records: every format is detected, every rule rejects with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraserve.prompting import Message
from loraserve.trainer.data import DataError, Rules, detect_format, parse, read_records, write_rejections


def messages(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = messages(("user", "Hi"), ("assistant", "Hello!"))


def test_json_arrays_and_json_lines_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([GOOD, GOOD]))
    (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "b.jsonl") == [GOOD, GOOD]
    (tmp_path / "c.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(tmp_path / "c.jsonl")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (GOOD, "messages"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, "sharegpt"),
        ({"text": "### Human: Hi\n### Assistant: Yo"}, "human-assistant"),
    ],
)
def test_formats_are_detected_and_parsed_alike(record: dict, fmt: str) -> None:
    assert detect_format([record]) == fmt
    parsed = parse([record], Rules())
    assert parsed.format == fmt and len(parsed.conversations) == 1
    assert [m.role for m in parsed.conversations[0].messages] == ["user", "assistant"]


def test_unknown_layout_names_the_expected_keys() -> None:
    with pytest.raises(DataError, match="expected 'messages'"):
        detect_format([{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match="no records"):
        detect_format([])


def test_human_assistant_text_keeps_every_turn_and_a_system_preamble() -> None:
    record = {"text": "Be a pirate.\n### Human: Hi\n### Assistant: Ahoy!\n### Human: Bye\n### Assistant: Fair winds!"}
    conversation = parse([record], Rules()).conversations[0]
    assert conversation.messages == (
        Message("system", "Be a pirate."),
        Message("user", "Hi"),
        Message("assistant", "Ahoy!"),
        Message("user", "Bye"),
        Message("assistant", "Fair winds!"),
    )


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ("not an object", "record", "not a JSON object"),
        ({"messages": "hi"}, "messages", "must be a list"),
        ({"messages": [{"role": "user"}]}, "messages[0]", "string 'role' and 'content'"),
        (messages(("assistant", "Hi"), ("user", "Yo")), "messages[0].role", "expected user"),
        (messages(("user", "Hi"), ("user", "Again")), "messages[1].role", "expected assistant"),
        (messages(("user", "Hi"), ("assistant", "  ")), "messages[1].content", "empty turn"),
        (messages(("user", "Hi"), ("assistant", "Yo"), ("user", "More?")), "messages[2]", "last turn must be"),
        (messages(("user", "Hi"), ("system", "Late"), ("assistant", "Yo")), "messages", "only come first"),
        (messages(("system", "Only a system message")), "messages", "no user or assistant turns"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from", "unknown speaker 'robot'"),
    ],
)
def test_each_bad_record_is_rejected_with_its_field_and_reason(record: object, field: str, reason: str) -> None:
    records = [GOOD, record] if not isinstance(record, dict) or "conversations" not in record else [record]
    parsed = parse(records, Rules())
    rejection = parsed.rejections[-1]
    assert rejection.field == field and reason in rejection.reason
    assert rejection.index == len(records) - 1 and rejection.record == record


def test_exact_duplicates_after_whitespace_normalisation_are_dropped() -> None:
    twin = messages(("user", "  Hi "), ("assistant", "Hello!\n"))
    parsed = parse([GOOD, twin, GOOD], Rules())
    assert len(parsed.conversations) == 1
    assert [(r.index, r.reason) for r in parsed.rejections] == [
        (1, "exact duplicate of record 0"),
        (2, "exact duplicate of record 0"),
    ]


@pytest.mark.parametrize(
    ("rules", "reason"),
    [
        (Rules(min_turns=4), "2 turns, fewer than min_turns=4"),
        (Rules(max_turns=1), "2 turns, more than max_turns=1"),
        (Rules(min_chars=100), "fewer than min_chars=100"),
        (Rules(max_chars=5), "more than max_chars=5"),
    ],
)
def test_optional_bounds(rules: Rules, reason: str) -> None:
    parsed = parse([GOOD], rules)
    assert not parsed.conversations and reason in parsed.rejections[0].reason


def test_rejections_are_written_one_per_line(tmp_path: Path) -> None:
    parsed = parse([GOOD, messages(("user", "Hi"))], Rules())
    write_rejections(tmp_path / "rejected.jsonl", parsed.rejections)
    lines = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert lines == [
        {
            "index": 1,
            "field": "messages[0]",
            "reason": "the last turn must be the assistant's",
            "record": messages(("user", "Hi")),
        }
    ]
