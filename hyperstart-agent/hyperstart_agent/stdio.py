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


def pump_stdin(process: Process, first: Any, requests: Iterator[Any]) -> None:
    try:
        for message in itertools.chain([first], requests):
            if message.data and process.stdin is not None:
                view = memoryview(message.data)
                while view:
                    view = view[os.write(process.stdin, view):]
            if message.close_stdin:
                process.close_stdin()
    except Exception as exc:  # the client went away or the process closed its stdin
        log.debug("stdin of %s ended: %s", process.exec_id, exc)
    finally:
        process.close_stdin()


def read_output(process: Process) -> Iterator[pb.StdioOutput]:
    streams = {fd: kind for fd, kind in ((process.stdout, pb.StdioOutput.STDOUT),
                                         (process.stderr, pb.StdioOutput.STDERR))
               if fd is not None}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        while streams:
            for fd, _ in poller.poll():
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
        process.drained.set()
