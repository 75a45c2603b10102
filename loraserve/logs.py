"""Logging setup, done once by the CLI: one JSON object per line (or plain text), carrying structured fields such as
request_id that code passes with `extra=`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted as a field.
_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


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
        return json.dumps(entry, default=str, ensure_ascii=False)


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
    """Formats a record as a readable line, with the `extra=` fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD_ATTRIBUTES)
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
