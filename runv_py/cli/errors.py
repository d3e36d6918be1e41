"""How every CLI front door turns an exception into one error line and an exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

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
