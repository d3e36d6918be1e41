"""A pre-started init helper that forks a copy of itself per container process.

Starting the init helper (`python -I -S -c <bootstrap>`, see init.py) costs a Python start-up
and its imports for every container and exec; under TCG that is most of a second, and in a VM
restored from a template it is paid again in every clone. The zygote is that helper started once
(single-threaded, imports done): asked over its socket, it forks twice and the grandchild runs
init.main() exactly as a spawned helper would, with the fds it was sent as 0-3. The middle
process exits at once, so the helper is an orphan that PID 1 (or the caller's subreaper) reaps,
as if the agent had spawned it. The agent gets the same messages from the helper either way;
if the zygote is gone it spawns helpers directly again.

Protocol (SOCK_SEQPACKET, fd 3 of the zygote): request = JSON {"argv": [mode, state_dir]} with
the helper's four fds; reply = {"ok": true} once forked, or {"error": "..."}. The zygote says
{"ready": true} first, once its imports are done.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading

log = logging.getLogger(__name__)

ZYGOTE_FD = 3
HELPER_FDS = 4
START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0


class Zygote:
    """The agent's side: starts the zygote on first use, asks it for helpers. After any failure
    it stays out of the way (launch() returns False: spawn the helper directly)."""

    def __init__(self, lib_dir: str, env: dict[str, str]) -> None:
        self._bootstrap = (f"import sys; sys.path.insert(0, {lib_dir!r}); "
                           "from hyperstart_agent.container.zygote import main; main()")
        self._env = env
        self._sock: socket.socket | None = None
        self._failed = False
        self._lock = threading.Lock()

    def launch(self, argv: list[str], fds: list[int]) -> bool:
        """Have the zygote fork a helper with `argv` ([mode, state_dir]) and `fds` as its
        fds 0-3. False if it could not: the caller spawns the helper itself."""
        with self._lock:
            if self._failed:
                return False
            try:
                if self._sock is None:
                    self._sock = self._start()
                socket.send_fds(self._sock, [json.dumps({"argv": argv}).encode()], fds)
                data = self._sock.recv(65536)
                reply = json.loads(data) if data else {"error": "the zygote exited"}
            except (OSError, ValueError) as exc:
                reply = {"error": str(exc) or type(exc).__name__}
            if "error" in reply:
                log.warning("spawning init helpers directly from now on: %s", reply["error"])
                self._failed = True
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                return False
            return True

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                       (os.POSIX_SPAWN_DUP2, null, 2),
                       (os.POSIX_SPAWN_DUP2, theirs.fileno(), ZYGOTE_FD)]
            os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", self._bootstrap],
                           self._env, file_actions=actions)
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(null)
            theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        if json.loads(ours.recv(65536) or b"{}").get("ready") is not True:
            ours.close()
            raise OSError("the zygote did not start")
        ours.settimeout(REPLY_TIMEOUT_S)
        return ours


def preload() -> None:
    """Every module a helper uses, imported once before any fork. An import left to the
    helper is paid in each container and exec: seccomp's alone took ~35 ms of an exec's
    ~95 ms in the guest under TCG."""
    from . import init, seccomp  # noqa: F401


def serve() -> None:
    """The zygote's loop; returns only in a forked helper (which then runs init.main)."""
    preload()
    sock = socket.socket(fileno=ZYGOTE_FD)
    sock.send(b'{"ready": true}')
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 65536, HELPER_FDS)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        try:
            argv = [str(a) for a in json.loads(data)["argv"]]
            if len(fds) != HELPER_FDS:
                raise ValueError(f"{len(fds)} fds sent, {HELPER_FDS} needed")
            middle = os.fork()
            if middle == 0:
                if os.fork() == 0:
                    _become_helper(sock, fds, argv)
                    return
                os._exit(0)
            os.waitpid(middle, 0)
            reply = {"ok": True}
        except Exception as exc:
            reply = {"error": f"zygote: {exc}"}
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps(reply).encode())


def _become_helper(sock: socket.socket, fds: list[int], argv: list[str]) -> None:
    os.close(sock.detach())
    for target, fd in enumerate(fds):
        os.dup2(fd, target, inheritable=True)
    os.closerange(HELPER_FDS, os.sysconf("SC_OPEN_MAX"))
    sys.argv = ["-c", *argv]


def main() -> None:
    serve()
    from .init import main as helper_main

    helper_main()
