"""The agent's zygote (container/zygote.py) on the host: each scenario runs in a new
interpreter that is a child subreaper, so that it adopts the helpers as PID 1 does in the guest
(and forks from a single-threaded process)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

_PRELUDE = """
import ctypes, json, os, signal, socket, sys, time
from pathlib import Path
from hyperstart_agent.container import engine
from hyperstart_agent.container.zygote import Zygote

ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # as the agent (PID 1) has it
zygote = Zygote(engine._LIB, engine._HELPER_ENV)
work = Path(sys.argv[1])
(work / "request.json").write_text('{"types": []}')


def children():
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            found[int(entry.name)] = cmdline
    return found


def zygote_pid():
    return next(pid for pid, cmd in children().items() if b"zygote import main" in cmd)


def spares(known):
    # The helpers forked ahead that wait for a request: a normal process again (they are
    # forked at idle priority) asleep in their wait, once they said they are ready.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = set()
        for pid in set(children()) - known:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "S" and os.sched_getscheduler(pid) == os.SCHED_OTHER:
                    found.add(pid)
            except OSError:
                pass
        if found:
            return found
        time.sleep(0.02)
    return set()


def start():
    # As the engine does: the helper's stdio and its sync socket; its "namespaces" mode with
    # no types reports its pid and waits for "placed".
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_RDWR)
    fds = [os.dup(null), os.dup(null), os.dup(null), theirs.detach()]
    launched = zygote.launch(["namespaces", str(work)], fds)
    for fd in [null, *fds]:
        os.close(fd)
    assert launched
    ours.settimeout(20)
    return ours, json.loads(ours.recv(65536))["pid"]


def launch():
    # The whole helper: it then says ready and exits 0.
    ours, pid = start()
    policy = os.sched_getscheduler(pid)
    ours.send(b'{"placed": true}')
    ready = json.loads(ours.recv(65536)).get("ready")
    _, status = os.waitpid(pid, 0)
    return pid, policy, ready, status
"""


def _scenario(body: str, tmp_path: Path) -> Any:
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_a_request_goes_to_the_helper_forked_before_it(tmp_path: Path) -> None:
    first, second, spare = _scenario("""
        first = launch()
        known = {zygote_pid()}
        spare = spares(known)
        print(repr((first, launch(), spare)))
    """, tmp_path)
    assert first[1:] == (0, True, 0)  # SCHED_OTHER, ready, exit 0
    # The second request's helper is the one that waited for it, and it was not forked at
    # idle priority, as the zygote forks its spares.
    assert spare == {second[0]} and second[1:] == (0, True, 0)


def test_the_next_spare_waits_for_the_helper_to_exec_or_exit(tmp_path: Path) -> None:
    during, after, pid = _scenario("""
        launch()
        owner = zygote_pid()
        spares({owner})
        sync, pid = start()  # the helper now waits for "placed"
        time.sleep(0.5)
        during = set(children()) - {owner, pid}
        sync.send(b'{"placed": true}')
        os.waitpid(pid, 0)
        print(repr((during, spares({owner}), pid)))
    """, tmp_path)
    assert during == set() and len(after) == 1 and pid not in after


def test_a_dead_spare_is_replaced_on_the_request(tmp_path: Path) -> None:
    spare, after = _scenario("""
        launch()
        (spare,) = spares({zygote_pid()})
        os.kill(spare, signal.SIGKILL)
        os.waitpid(spare, 0)
        print(repr((spare, launch())))
    """, tmp_path)
    assert after[0] != spare and after[2:] == (True, 0)


def test_the_spare_exits_with_the_zygote(tmp_path: Path) -> None:
    status = _scenario("""
        launch()
        owner = zygote_pid()
        (spare,) = spares({owner})
        os.kill(owner, signal.SIGKILL)
        os.waitpid(owner, 0)
        _, status = os.waitpid(spare, 0)  # would hang if the spare outlived its zygote
        print(repr(status))
    """, tmp_path)
    assert status == 0
