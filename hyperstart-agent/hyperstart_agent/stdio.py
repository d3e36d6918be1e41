"""Stdio of one container process over the Stdio stream: stdin from the host into the process's
pipe, stdout and stderr out to the host, kept apart, each closed with an eof message. Writing
to the stream blocks while gRPC's flow control holds it, and the pipe then fills and holds the
process: nothing is dropped."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._pb import hyperstart_pb2 as pb

if TYPE_CHECKING:
    from .container.engine import Process

log = logging.getLogger(__name__)
CHUNK = 64 * 1024
IDLE_CHECK_MS = 1000


def pump_stdin(process: Process, first: Any, requests: Iterator[Any]) -> None:
    try:
        for message in itertools.chain([first], requests):
            if message.data:
                process.write_stdin(message.data)
            if message.close_stdin:
                process.close_stdin()
    except Exception as exc:  # the client went away or the process closed its stdin
        log.debug("stdin of %s ended: %s", process.exec_id, exc)
    finally:
        process.close_stdin()


def read_output(process: Process, fds: tuple[int | None, int | None]
                ) -> Iterator[pb.StdioOutput]:
    """Stream the process's (stdout, stderr), handed over by attach_reader, to their ends,
    then give them back to be closed. A process removed by force normally ends them (its
    writers are killed); if a stray process still holds one, the stream ends once the
    process is closed and nothing more comes."""
    streams = {fd: kind for fd, kind in zip(fds, (pb.StdioOutput.STDOUT,
                                                  pb.StdioOutput.STDERR), strict=True)
               if fd is not None}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        while streams:
            ready = poller.poll(IDLE_CHECK_MS)
            if not ready and process.closed:
                for fd in list(streams):
                    yield pb.StdioOutput(stream=streams.pop(fd), eof=True)
            for fd, _ in ready:
                try:
                    data = os.read(fd, CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # a pty master reads EIO once the slave closed
                        raise
                    data = b""
                if data:
                    yield pb.StdioOutput(stream=streams[fd], data=data)
                else:
                    poller.unregister(fd)
                    yield pb.StdioOutput(stream=streams.pop(fd), eof=True)
    finally:
        process.release_output()
        process.drained.set()
