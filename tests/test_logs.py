"""Logging: values a client controls (a correlation id, an adapter id, a prompt) cannot forge log lines or fields, in
either format."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from loraserve.logs import JsonFormatter, TextFormatter

FORGERIES = {
    "correlation_id": 'abc request_id=forged\n2026-01-01 00:00:00,000 ERROR loraserve.server: "admin" login',
    "adapter_id": "x\r\ny=1\x1b[2J\u2028z",
    "prompt": 'say "hi" \\ bye',
}
# A logfmt field: a key, "=", then a bare value or a JSON string.
FIELD = r' (\w+)=("(?:[^"\\]|\\.)*"|[^ "]*)'


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("loraserve.server.status", logging.INFO, __file__, 1, message, args, None)
    entry.__dict__.update(extra)
    return entry


def text_fields(line: str, message: str = "m") -> dict[str, str]:
    """The key=value fields after the message (nothing else may follow it), JSON strings unquoted."""
    rest = line.split(f": {message}", 1)[1]
    assert re.fullmatch(f"(?:{FIELD})*", rest), rest
    return {k: json.loads(v) if v.startswith('"') else v for k, v in re.findall(FIELD, rest)}


def test_text_values_are_quoted_and_escaped_so_they_cannot_forge_lines_or_fields() -> None:
    line = TextFormatter().format(record("request received", request_id="r-1", rpc="Generate", **FORGERIES))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert text_fields(line, "request received") == {"request_id": "r-1", "rpc": "Generate", **FORGERIES}


@pytest.mark.parametrize("value", ["", "a b", "a=b", 'a"b', "tab\there", "\x00", "\x85", "\u202e"])
def test_text_quotes_values_that_would_be_ambiguous_bare(value: str) -> None:
    line = TextFormatter().format(record("m", field=value))
    assert ' field="' in line
    assert text_fields(line) == {"field": value}
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u202e]", line)


def test_text_leaves_plain_values_bare() -> None:
    line = TextFormatter().format(record("m", request_id="3f2a-9", tokens=12, ok=True))
    assert line.endswith(": m request_id=3f2a-9 tokens=12 ok=True")


def test_text_escapes_control_characters_in_the_message() -> None:
    line = TextFormatter().format(record("adapter %s not found", "a\n2026-01-01 ERROR forged\x1b[1m"))
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith(": adapter a\\n2026-01-01 ERROR forged\\u001b[1m not found")


def test_json_lines_stay_one_line_and_keep_the_values_exact() -> None:
    line = JsonFormatter().format(record("adapter %s\nfound", "x\ny\x85", request_id="r-1", **FORGERIES))
    assert len(line.splitlines()) == 1  # splitlines also breaks at \x85, \u2028 and \u2029, which JSON allows raw
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line)
    entry = json.loads(line)
    assert entry["message"] == "adapter x\ny\x85\nfound"
    assert {k: entry[k] for k in ("request_id", *FORGERIES)} == {"request_id": "r-1", **FORGERIES}


def test_a_traceback_in_text_format_cannot_start_a_record_of_its_own() -> None:
    forged = "boom\n2026-01-01 00:00:00,000 ERROR loraserve.server.app: admin token leaked\rx\x85y"
    try:
        raise ValueError(forged)
    except ValueError:
        record = logging.LogRecord("loraserve", logging.ERROR, __file__, 1, "unexpected error", None, sys.exc_info())
    lines = TextFormatter().format(record).split("\n")
    assert lines[0].endswith("unexpected error")
    assert all(line.startswith("    ") for line in lines[1:]) and len(lines) > 2
    assert not any(ch in "\r\x85" for line in lines for ch in line)
