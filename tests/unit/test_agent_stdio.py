"""The agent's output pump when its host goes away mid-stream (a checkpoint takes the host's
connections): what did not end waits for the next reader instead of being closed, so a
process keeps its pipes (and is not killed by SIGPIPE) and a restored sandbox's host can
attach to it; a normal end still releases and drains."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing

from hyperstart_agent import stdio
from hyperstart_agent.container.engine import Process
from hyperstart_agent.flare import Flare


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
    gone = Flare()
    with closing(stdio.outputs(process, fds, stdio.HostGone(gone.fileno(), select.POLLIN))
                 ) as chunks:
        seen = [next(chunks), next(chunks)]
        gone.fire()
        seen += list(chunks)
    gone.close()
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


def test_a_half_close_keeps_the_pump_and_a_reset_ends_it() -> None:
    """The vsock pump's host: its half-close (the host's stdin EOF) is not its going away;
    its connection closed is, once the process is quiet."""
    process, out_w, err_w = _process()
    fds = process.attach_reader()
    assert fds is not None
    ours, host = socket.socketpair()
    host.shutdown(socket.SHUT_WR)
    result: list[list[tuple[int, bytes]]] = []
    pump = threading.Thread(target=lambda: result.append(list(
        stdio.outputs(process, fds, stdio.HostGone(ours.fileno(), 0)))), daemon=True)
    pump.start()
    pump.join(0.5)
    assert pump.is_alive()
    host.close()
    pump.join(5)
    assert not pump.is_alive() and result == [[]]
    assert not process.reader_attached and process.stdout == fds[0]
    process.close()
    for fd in (out_w, err_w, ours.fileno()):
        os.close(fd)


def _wakeups(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        return sum(int(line.split()[1]) for line in f
                   if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))


def test_an_idle_pump_sleeps_until_its_process_is_closed() -> None:
    """A quiet process's output pump and stdin reader do not wake on a timer (each wake-up of
    an idle guest is CPU its host spends emulating it); closing the process still ends both."""
    process, out_w, err_w = _process()
    r, w = os.pipe()
    process.stdin = w
    fds = process.attach_reader()
    assert fds is not None
    ours, host = socket.socketpair()
    ours.settimeout(stdio.IDLE_CHECK_MS / 1000)  # as StreamListener gives it to both
    tids: list[int] = []
    ended: list[str] = []

    def pump() -> None:
        tids.append(threading.get_native_id())
        list(stdio.outputs(process, fds, stdio.HostGone(ours.fileno(), 0)))
        ended.append("output")

    def stdin() -> None:
        tids.append(threading.get_native_id())
        stdio._stream_stdin(process, ours.dup())
        ended.append("stdin")

    threads = [threading.Thread(target=pump, daemon=True),
               threading.Thread(target=stdin, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while len(tids) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # both are in poll() now
        before = [_wakeups(tid) for tid in tids]
        time.sleep(2.5)
        assert [_wakeups(tid) for tid in tids] == before
    finally:
        process.close()
    for thread in threads:
        thread.join(5)
    assert sorted(ended) == ["output", "stdin"]
    assert process.stdout is None and process.stdin is None and process.drained.is_set()
    for fd in (out_w, err_w, r):
        os.close(fd)
    ours.close()
    host.close()


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



# Run in a child whose open-file limit is then below every free fd, as a container sharing
# PID 1's pid namespace can set the agent's: no eventfd can be made.
_NO_FD_LEFT = """
import os, resource, threading, time
from hyperstart_agent import stdio
from hyperstart_agent.container.engine import Process

ended = Process("c", "", 1, None, *os.pipe()[:1], None, None)
quiet = Process("c", "x", 2, None, *os.pipe()[:1], None, None)
fds, quiet_fds = ended.attach_reader(), quiet.attach_reader()
resource.setrlimit(resource.RLIMIT_NOFILE, (2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    os.eventfd(0)
    raise SystemExit("an fd could still be made")
except OSError:
    pass
threading.Timer(0.3, ended.close).start()
t = time.monotonic()
print(list(stdio.outputs(ended, fds)), ended.drained.is_set(), time.monotonic() - t < 3)
rpc_ends = time.monotonic() + 0.3
t = time.monotonic()
print(list(stdio.read_output(quiet, quiet_fds, None, lambda: time.monotonic() < rpc_ends)),
      quiet.reader_attached, quiet.drained.is_set(), time.monotonic() - t < 3)
"""


def test_with_no_fd_left_for_a_flare_the_pump_looks_each_second() -> None:
    """The pump still ends once the process is closed, and the Stdio RPC's pump once the RPC
    has ended, each seen on the IDLE_CHECK_MS timer as before the flares (which need an fd
    each); the quiet process's output is left to the next reader."""
    child = subprocess.run([sys.executable, "-c", _NO_FD_LEFT], capture_output=True,
                           timeout=60, check=False)
    assert child.returncode == 0, child.stderr.decode()
    assert child.stdout.decode().splitlines() == [
        "[(0, b'')] True True",
        "[] False False True",
    ]
