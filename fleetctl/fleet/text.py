"""Text from outside (nodes, agents, users, the network) made safe for logs and terminals.

Node-reported facts, enrollment hostnames, user names and error texts that echo them reach log lines and
``fleetctl`` output. Raw, they forge log lines (a newline starts a fake entry), smuggle terminal escape
sequences (ESC [ … rewrites the operator's screen, OSC 52 writes the clipboard) or flood the log (a 70 KB
"hostname" echoed in full). Two helpers, one per destination:

- ``safe_text(value, limit)`` for logs: every control character (C0, DEL, C1, the Unicode line and paragraph
  separators, bidirectional overrides) becomes a visible escape (``\\n``, ``\\x1b``, ``\\u202e``) so the line
  stays one line and shows what was sent; longer than ``limit`` characters is cut, saying how much was cut.
  ``SafeLogFormatter`` applies it to every log record's message (tracebacks are the controller's own).
- ``terminal_safe(value)`` for terminals: control characters and escape sequences removed (a newline or tab
  inside a table cell becomes a space), so a cell is exactly what it shows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

# C0 controls, DEL, C1 controls, line/paragraph separators, bidi embeddings/overrides/isolates, BOM
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
# ESC-introduced sequences (CSI ``ESC [ … final``, OSC ``ESC ] … BEL/ST``, two-byte ``ESC x``) and their
# 8-bit C1 forms: removed whole, so no parameter bytes are left behind as visible junk
_ESCAPE_SEQ_RE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC … BEL / ST
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS, SOS, PM, APC … ST
    r"|\x1b[@-Z\\-_ -/]?[0-~]?")  # any other ESC sequence (and a lone ESC)
_WHITESPACE_CONTROLS = str.maketrans({"\n": " ", "\r": " ", "\t": " ", "\v": " ", "\f": " ",
                                      "\u2028": " ", "\u2029": " "})
DEFAULT_LOG_LIMIT = 512
LOG_MESSAGE_LIMIT = 4096
# a whole log line (time, level, logger and message, as UTF-8) at most this long: the message limit counts
# characters after escaping, so a long prefix or multi-byte text could still push a line past 4 KB
LOG_LINE_BYTES = 4096


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if c in named:
        return named[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def safe_text(value: Any, limit: int = DEFAULT_LOG_LIMIT) -> str:
    """``value`` as one printable log-safe line of at most ``limit`` characters (plus the cut note)."""
    text = value if isinstance(value, str) else str(value)
    cut = 0
    if len(text) > limit:
        cut, text = len(text) - limit, text[:limit]
    text = _CONTROL_RE.sub(_escape, text)
    return f"{text}…(+{cut} chars)" if cut else text


def terminal_safe(value: Any) -> str:
    """``value`` without escape sequences or control characters (whitespace controls become spaces)."""
    text = value if isinstance(value, str) else str(value)
    if not _CONTROL_RE.search(text):
        return text
    text = _ESCAPE_SEQ_RE.sub("", text).translate(_WHITESPACE_CONTROLS)
    return _CONTROL_RE.sub("", text)


def terminal_safe_tree(obj: Any) -> Any:
    """Every string inside a JSON-like value made ``terminal_safe`` (keys too)."""
    if isinstance(obj, str):
        return terminal_safe(obj)
    if isinstance(obj, dict):
        return {terminal_safe_tree(k): terminal_safe_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [terminal_safe_tree(v) for v in obj]
    return obj


class SafeLogFormatter(logging.Formatter):
    """A formatter whose message part is ``safe_text`` (one line, at most ``LOG_MESSAGE_LIMIT`` characters):
    whatever a node or client put into a logged value cannot start a forged line or hide in escapes.

    ``json_lines=True`` (``--log-format json``): each record is one JSON object per line — ``time`` (ISO 8601
    UTC), ``level``, ``logger``, ``message`` (the same safe, cut text) and, with an exception, ``exception``."""

    def __init__(self, fmt: str | None = None, *, json_lines: bool = False) -> None:
        super().__init__(fmt)
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return super().format(record)
        entry = {"time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "message": safe_text(record.getMessage(), LOG_MESSAGE_LIMIT)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def formatMessage(self, record: logging.LogRecord) -> str:
        raw, limit = record.message, LOG_MESSAGE_LIMIT
        for _ in range(4):  # cut the message, not the line, so safe_text's "(… chars)" mark stays at the end
            record.message = safe_text(raw, limit)
            line = super().formatMessage(record)
            excess = len(line.encode("utf-8", "replace")) - LOG_LINE_BYTES
            if excess <= 0:
                return line
            limit = max(64, limit - excess - 64)
        return line.encode("utf-8", "replace")[:LOG_LINE_BYTES].decode("utf-8", "ignore")


def install_safe_logging(level: str | int, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
                         json_lines: bool = False) -> None:
    """``logging.basicConfig`` with ``SafeLogFormatter`` on the root handler (JSON lines with ``json_lines``)."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(SafeLogFormatter(fmt, json_lines=json_lines))
