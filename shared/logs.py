"""Log output: plain text or one JSON object per line.

Entry points choose the format (``--log-format``); modules log with dotted
logger names and %-style arguments as usual. A record may carry structured
``fields`` (``extra={"fields": {...}}``): JSON output merges them into the
object, text output appends them as ``key=value``.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


#: Line breaks in a message are written escaped: a value from a client can never
#: start a line of its own (a traceback after the message still spans lines).
_BREAKS = str.maketrans(
    {"\r": "\\r", "\n": "\\n", "\x85": "\\x85", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


# Text values made only of these characters are written as they are; others quoted.
_BARE = re.compile(r"[A-Za-z0-9_.,:/@+*\-]+")


def text_value(value: Any) -> str:
    """A value as a text log line shows it: bare if it is a plain token, else a JSON
    string, which cannot break the line or pass for another ``key=value`` pair."""
    if not isinstance(value, str):
        return str(value)
    if _BARE.fullmatch(value):
        return value
    return _quoted(value)


def _quoted(value: str) -> str:
    quoted = orjson.dumps(value).decode()
    return quoted.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def announce(line: str) -> None:
    """Print a line others wait for ("listening on ...", "worker ready") in one write:
    the processes of ``--processes N`` share their standard output, and a line
    printed as two writes (text, then its newline) could interleave with another's."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def text_pairs(fields: dict[str, Any]) -> str:
    """``key=value`` pairs of a text log line (values as :func:`text_value` writes
    them; None left out). One loop, no call per field: a request's line is written
    on every request. A string's rendering is looked up in :data:`_RENDERED` first
    (the tenants, models, routes and endpoints of a busy process repeat)."""
    rendered = _RENDERED
    return " ".join(
        [
            f"{k}={rendered.get(v) or _render(v)}" if v.__class__ is str else f"{k}={v}"
            for k, v in fields.items()
            if v is not None
        ]
    )


#: Strings as a text line shows them (:func:`text_value`), up to
#: :data:`MAX_RENDERED` of them (then emptied: a client's values cannot grow it).
_RENDERED: dict[str, str] = {}
MAX_RENDERED = 4096


def _render(value: str) -> str:
    text = value if _BARE.fullmatch(value) else _quoted(value)
    if len(_RENDERED) >= MAX_RENDERED:
        _RENDERED.clear()
    _RENDERED[value] = text
    return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_BREAKS)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + text_pairs(fields)
        return line


def current_format() -> str:
    """The format the root logger writes in ("json" or "text")."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return "json"
    return "text"


def setup(level: str, fmt: str = "text") -> None:
    """Configure the root logger once, in an entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
