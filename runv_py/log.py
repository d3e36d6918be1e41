"""Logging set-up for every front door: text or logrus-style JSON lines, to stderr or a file."""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Literal

from .timestamps import rfc3339

LogFormat = Literal["text", "json"]

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}
_CONTEXT_KEYS = ("sandbox", "container", "phase")


class JsonFormatter(logging.Formatter):
    """One JSON object a line with logrus's keys: level, msg, time (containerd reads these)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "level": _LEVELS.get(record.levelno, "info"),
            "msg": record.getMessage(),
            "time": rfc3339(record.created, 9),
        }
        for key in _CONTEXT_KEYS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info and record.levelno <= logging.DEBUG:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{key}={getattr(record, key)}" for key in _CONTEXT_KEYS if hasattr(record, key)
        )
        line = f"{record.name.rsplit('.', 1)[-1]}: {_LEVELS.get(record.levelno, 'info')}: "
        line += record.getMessage() + (f" ({context})" if context else "")
        if record.exc_info and record.levelno <= logging.DEBUG:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(
    *, debug: bool = False, fmt: LogFormat = "text", path: str | None = None,
    stream: IO[str] | None = None,
) -> None:
    """Configure the root logger once per process. `path` appends to a file (runc's --log)."""
    handler: logging.Handler
    if path:
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.INFO)  # "Using selector: ..." per loop
