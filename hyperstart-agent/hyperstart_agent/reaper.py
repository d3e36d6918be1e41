"""Zombie reaping for PID 1: every orphan in the guest ends up as our child."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ExitListener = Callable[[int, int], None]


class Reaper:
    """Reaps every child of PID 1 and tells listeners each (pid, wait status).

    SIGCHLD is blocked before any thread starts, so the main thread alone takes it with
    sigwaitinfo and no other code in the agent may call waitpid.
    """

    def __init__(self) -> None:
        self._listeners: list[ExitListener] = []
        self._lock = threading.Lock()

    @staticmethod
    def block_sigchld() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})

    def add_listener(self, listener: ExitListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def reap_ready(self) -> int:
        reaped = 0
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            reaped += 1
            with self._lock:
                listeners = list(self._listeners)
            for listener in listeners:
                try:
                    listener(pid, status)
                except Exception:
                    log.exception("exit listener failed for pid %d", pid)

    def run_forever(self) -> None:
        while True:
            try:
                signal.sigwaitinfo({signal.SIGCHLD})
                self.reap_ready()
            except Exception:
                log.exception("reaper loop error (continuing)")
