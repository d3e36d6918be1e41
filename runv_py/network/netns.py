"""Running code inside a network namespace given by path. Work happens on a fresh thread that
joins the namespace with setns(2) and ends afterwards: a thread's network namespace is its own,
so nothing forks (pyroute2's NetNS would fork; forking next to gRPC threads is unsafe) and the
process's other threads stay where they are."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from ..errors import NetworkError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetNs:
    """An open network namespace. Holding the fd keeps the namespace usable for teardown even
    after its bind mount went away; close() drops it. Idempotent close."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"linux.namespaces[network].path: cannot open {path}: "
                               f"{exc.strerror}") from exc

    def _enter(self) -> None:
        if self.fd is None:
            raise NetworkError(f"network namespace {self.path} is closed")
        if _libc.setns(self.fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            what = ("is not a network namespace" if code == errno.EINVAL
                    else f"cannot be entered: {os.strerror(code)}")
            raise NetworkError(f"linux.namespaces[network].path: {self.path} {what}")

    def _start(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()

        def target() -> None:
            try:
                self._enter()
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=target, name="netns", daemon=True).start()
        return future

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on a thread inside the namespace; the caller waits."""
        return self._start(fn).result()

    async def call(self, fn: Callable[[], T]) -> T:
        """fn() on a thread inside the namespace, awaited without blocking the loop."""
        return await asyncio.wrap_future(self._start(fn))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
