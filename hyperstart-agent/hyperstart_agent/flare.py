"""A one-shot signal that a thread can poll() beside its other fds: the agent's waiters sleep
until something happens instead of waking on a timer to look at a flag (every timer wake-up
of an idle guest is emulated by its host)."""

from __future__ import annotations

import os
import threading


class Flare:
    """An eventfd that polls POLLIN once fire() was called, and stays so. Its owner (the
    thread that polls it) closes it; fire() after close() does nothing, so a firing thread
    never writes to an fd number that was closed and given to something else."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def fire(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
