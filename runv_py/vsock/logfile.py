"""Where the backend's processes log: a file of at most LOG_MAX_BYTES plus one rotated
predecessor (the state dir is on tmpfs, and much of what is logged is the guest's doing), or
stderr without a file."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_MAX_BYTES = 1 << 20


def file_fds() -> set[int]:
    """The fds of the log files in use: a forked worker keeps them (and its handlers)."""
    return {h.stream.fileno() for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and h.stream is not None}


def setup(path: Path | None, fmt: str, *, debug: bool = False,
          max_bytes: int = LOG_MAX_BYTES) -> None:
    """Replace the root logger's handlers by one to `path` (stderr without); a process that
    already logs to `path` (a worker forked from its keeper) keeps its handler."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if path is not None and any(isinstance(h, logging.FileHandler)
                                and h.baseFilename == str(path.absolute())
                                for h in root.handlers):
        return
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if path is None else
        logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=1))
    handler.setFormatter(logging.Formatter(fmt))
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
