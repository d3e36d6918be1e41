"""The shim's stdin from containerd's fifo (real fifos and pipes, no VM): the process gets
every byte its client sent and EOF only after CloseIO, whenever containerd's writer opens,
reopens or closes the fifo. Before the fix, a fifo read while containerd's writer was not
(or not yet again) open returned EOF, and `crictl exec -i` lost its piped stdin."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
import time
from pathlib import Path

from runv_py.shim.stdio import ProcessIO

WRITE_DEADLINE_S = 10


def _reader(fd: int, into: list[bytes]) -> threading.Thread:
    """Reads fd (the process's stdin) to EOF on a thread, as the process would."""

    def run() -> None:
        try:
            while data := os.read(fd, 65536):
                into.append(data)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def _writer(fifo: Path, data: bytes) -> None:
    """containerd's side: open the fifo for writing, write, close; a shim that stopped
    reading fails the test within WRITE_DEADLINE_S instead of blocking it."""

    def write() -> None:
        deadline = time.monotonic() + WRITE_DEADLINE_S
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:  # ENXIO: no reader
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise AssertionError("the shim has no reader on the stdin fifo") from e
                time.sleep(0.05)
        try:
            view = memoryview(data)
            while view:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [fd], [], left)[1]:
                    raise AssertionError(f"the shim stopped reading stdin ({len(view)} "
                                         "bytes not taken)")
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    await asyncio.to_thread(write)


async def _stdin_of(fifo: Path, feed: list[tuple[str, bytes]]) -> bytes:
    """Open the process's stdio with the fifo as stdin, play `feed` (("write", data) from a
    writer that opens and closes the fifo, ("sleep", b""), ("closeio", b"")) and return what
    the process read from stdin up to its EOF."""
    io = await ProcessIO.open(str(fifo), "", "", False, container_id="c", namespace="ns")
    got: list[bytes] = []
    thread = _reader(os.dup(io.outgoing[0]), got)
    io.handed_over()  # as once the supervisor has its copy
    try:
        for action, data in feed:
            if action == "write":
                await _writer(fifo, data)
            elif action == "sleep":
                await asyncio.sleep(0.2)
            else:
                await io.close_stdin()
        for _ in range(100):
            if not thread.is_alive():
                break
            await asyncio.sleep(0.05)
        assert not thread.is_alive(), f"stdin did not end (read so far: {b''.join(got)!r})"
    finally:
        await io.close()
    return b"".join(got)


def test_stdin_read_before_containerd_opens_the_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    got = asyncio.run(_stdin_of(fifo, [("sleep", b""), ("write", b"hello\n"),
                                       ("closeio", b"")]))
    assert got == b"hello\n"


def test_stdin_survives_a_writer_that_closes_and_reopens(tmp_path: Path) -> None:
    """A writer's open of a fifo interrupted by a signal drops and retakes its writer count:
    the shim must not see that moment as the end of stdin."""
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    got = asyncio.run(_stdin_of(fifo, [("write", b"one "), ("sleep", b""),
                                       ("write", b"two"), ("closeio", b"")]))
    assert got == b"one two"


def test_closeio_does_not_cut_stdin_that_is_still_flowing(tmp_path: Path) -> None:
    """More than the pipes hold, with CloseIO right after the writer closed: all of it."""
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    data = os.urandom(4 << 20)
    got = asyncio.run(_stdin_of(fifo, [("write", data), ("closeio", b"")]))
    assert got == data


def test_stdin_ends_at_closeio_when_the_writer_is_gone(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    assert asyncio.run(_stdin_of(fifo, [("closeio", b"")])) == b""
