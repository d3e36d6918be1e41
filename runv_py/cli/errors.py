"""How every CLI front door turns an exception into one error line and an exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from .. import disk
from ..errors import RunvError

log = logging.getLogger("runv_py.cli")


def run_guarded(prog: str, body: Callable[[], int], *, log_file: str | None = None) -> int:
    """Run a command; RunvError -> its message on stderr and its exit code. With a log file
    (runc's --log) the error is also logged there, where containerd looks for it."""
    try:
        return body()
    except RunvError as exc:
        log.debug("%s failed", prog, exc_info=True)
        if log_file:
            log.error(str(exc))
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in disk.STORAGE_ERRNOS:
            raise
        # A disk that filled (or turned read-only) after the checks: still one line.
        where = f" ({exc.filename})" if exc.filename else ""
        log.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: error: {exc.strerror}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def exit_after(main: Callable[[], int]) -> NoReturn:
    """A console script: run `main` and end the process with its status, without the
    interpreter's teardown (freeing every object of every module: ~30 ms of a `runv run`,
    7-10 ms of a `runv exec` or `state`). Standard streams and log handlers are flushed first;
    the CLIs register no atexit work and start only daemon threads."""
    try:
        status = main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    for stream in (sys.stdout, sys.stderr):
        # A reader that went away, a stream closed: what was written so far is all there is.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    os._exit(status)
