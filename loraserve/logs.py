"""Logging setup, done once by the CLI: one JSON object per line (or plain text), carrying structured fields such as
request_id that code passes with `extra=`."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted as a field.
_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

# Characters never written raw, since log values may come from clients (a correlation id, an adapter id, a prompt):
# control characters (line breaks, ANSI escapes), what str.splitlines and editors also take as line ends (\x85,
# \u2028, \u2029), and invisible or reordering ones (zero-width spaces, bidirectional overrides).
_UNSAFE = "\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_UNSAFE_CHARACTER = re.compile(f"[{_UNSAFE}]")
_NEEDS_QUOTES = re.compile(f'[\\s="\\\\{_UNSAFE}]')  # also anything that would make key=value ambiguous
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """text with each unsafe character written as its JSON escape (\\n, \\u001b): one line, nothing hidden."""
    return _UNSAFE_CHARACTER.sub(lambda match: _SHORT_ESCAPES.get(match[0]) or f"\\u{ord(match[0]):04x}", text)


def logfmt_value(value: object) -> str:
    """value as logfmt writes it: bare when plain, else a JSON string, so that no value can end the line or fake a
    field."""
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, the `extra=` fields, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRIBUTES})
        if "trace_id" not in entry:
            entry.update(_trace_ids())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes quotes and C0 control characters; escape() also the line ends JSON allows raw.
        return escape(json.dumps(entry, default=str, ensure_ascii=False))


def _trace_ids() -> dict[str, str]:
    """The current OpenTelemetry span's ids (an RPC's, in the thread serving it), if any."""
    try:
        from opentelemetry import trace
    except ImportError:  # the client-only install has no OpenTelemetry
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class TextFormatter(logging.Formatter):
    """Formats a record as a readable line, with the `extra=` fields appended as logfmt key=value (values quoted and
    escaped when needed; control characters in the message escaped too)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = copy.copy(record)  # other handlers get the record as it was
        safe.message = escape(record.message)
        return super().formatMessage(safe)

    def formatException(self, ei: Any) -> str:
        """The traceback on the lines after the record's, each indented and escaped: an exception message carrying a
        client's text cannot start a line that looks like a record of its own."""
        return "\n".join(f"    {escape(line)}" for line in super().formatException(ei).splitlines())

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        items = record.__dict__.items()
        extras = " ".join(f"{k}={logfmt_value(v)}" for k, v in items if k not in _STANDARD_ATTRIBUTES)
        return f"{line} {extras}" if extras else line


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send loraserve's logs (and the libraries') to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def configure_logging_from(args: argparse.Namespace) -> None:
    """configure_logging with the command's --log-level and --log-format (or their LORASERVE_* variables)."""
    from loraserve.config import LogConfig, from_namespace

    config = from_namespace(LogConfig, args)
    configure_logging(config.log_level, config.log_format)
