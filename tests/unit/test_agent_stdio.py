"""The agent's output pump when its host goes away mid-stream (a checkpoint takes the host's
connections): what did not end waits for the next reader instead of being closed, so a
process keeps its pipes (and is not killed by SIGPIPE) and a restored sandbox's host can
attach to it; a normal end still releases and drains."""

from __future__ import annotations

import os
import socket
import threading
from contextlib import closing

from hyperstart_agent import stdio
from hyperstart_agent.container.engine import Process


def _process() -> tuple[Process, int, int]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    return Process("c", "", 1, None, out_r, err_r, None), out_w, err_w


def test_host_gone_mid_stream_leaves_the_output_to_the_next_reader() -> None:
    process, out_w, err_w = _process()
    os.close(err_w)  # stderr ends; stdout does not
    fds = process.attach_reader()
    assert fds is not None
    os.write(out_w, b"one")
    gone = threading.Event()
    with closing(stdio.outputs(process, fds, gone.is_set)) as chunks:
        seen = [next(chunks), next(chunks)]
        gone.set()
        seen += list(chunks)
    assert sorted(seen) == [(stdio.STDOUT, b"one"), (stdio.STDERR, b"")]
    assert not process.reader_attached and not process.drained.is_set()
    assert process.stderr is None and process.stdout == fds[0]
    again = process.attach_reader()
    assert again == (fds[0], None)
    os.write(out_w, b"two")
    os.close(out_w)
    assert list(stdio.outputs(process, again)) == [(stdio.STDOUT, b"two"),
                                                   (stdio.STDOUT, b"")]
    assert process.drained.is_set() and process.stdout is None


def test_a_reader_closed_early_detaches_and_a_closed_process_releases() -> None:
    process, out_w, err_w = _process()
    fds = process.attach_reader()
    assert fds is not None
    os.write(out_w, b"x")
    chunks = stdio.outputs(process, fds)
    assert next(chunks) == (stdio.STDOUT, b"x")
    chunks.close()   # the consumer's send failed: the host is gone
    assert process.attach_reader() == fds
    process.close()
    chunks = stdio.outputs(process, fds)
    assert next(chunks)[1] == b""   # closed and quiet: the streams end
    chunks.close()
    assert process.stdout is None and process.stderr is None
    for fd in (out_w, err_w):
        os.close(fd)


def test_reset_tells_a_reset_from_a_half_close() -> None:
    a, b = socket.socketpair()
    b.shutdown(socket.SHUT_WR)
    assert not stdio._reset(a)
    b.close()
    assert stdio._reset(a)
    a.close()


def test_a_second_stdio_stream_registration_replaces_an_unclaimed_one() -> None:
    """The host's StdioStream call timed out on a starved guest after the agent had
    registered its token; the host asks again with a new token: that one gets the output
    (the old one is refused), instead of 'already attached' until the first one expires and
    closes the process's stdin."""
    process, out_w, err_w = _process()
    pending = stdio.PendingStreams()
    first, second = b"a" * stdio.TOKEN_BYTES, b"b" * stdio.TOKEN_BYTES
    pending.register(process, first)
    pending.register(process, second)
    assert pending.claim(first) is None
    claimed = pending.claim(second)
    assert claimed is not None and claimed[0] is process
    assert claimed[1] == (process.stdout, process.stderr)
    assert not pending
    # Once a connection has claimed it, the output is attached: a third registration fails.
    try:
        pending.register(process, b"c" * stdio.TOKEN_BYTES)
    except stdio.AgentError as exc:
        assert exc.code == "FAILED_PRECONDITION"
    else:
        raise AssertionError("registered a process whose output a connection holds")
    for fd in (out_w, err_w):
        os.close(fd)
