"""A pre-started init helper that forks a copy of itself per container process.

Starting the init helper (`python -I -S -c <bootstrap>`, see init.py) costs a Python start-up
and its imports for every container and exec; under TCG that is most of a second, and in a VM
restored from a template it is paid again in every clone. The zygote is that helper started once
(single-threaded, imports done). It forks twice and the grandchild waits for a request; asked
over its socket, the zygote hands the request to that waiting helper (see serve()). The helper
then runs init.main() exactly as a spawned helper would, with the fds it was sent as
0-3. The middle process exits at once, so the helper is an orphan that PID 1 (or the caller's
subreaper) reaps, as if the agent had spawned it. The agent gets the same messages from the
helper either way; if the zygote is gone it spawns helpers directly again.

Protocol (SOCK_SEQPACKET, fd 3 of the zygote): request = JSON {"argv": [mode, state_dir]} with
the helper's four fds; reply = {"ok": true} once a helper has them, or {"error": "..."}. The
zygote says {"ready": true} first, once its imports are done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import sys
import threading

log = logging.getLogger(__name__)

ZYGOTE_FD = 3
HELPER_FDS = 4
START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0
SPARE_READY = b"spare ready"


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
    """The zygote's loop; returns only in a helper (which then runs init.main).

    It keeps one helper forked ahead (the spare) and hands each request to it: no fork is on
    the request's path. In a clone of a template the spare is the template's, so the clone's
    first container does not fork at all: under TCG a fresh clone's first two forks took ~45
    ms of its container's creation.

    The next spare is forked once the helper handed the last request has exec'd or exited
    (its end of the socket closes), and as SCHED_IDLE: forked while that helper still set up
    its process, it took the one vCPU from it and slowed the creation and the start by as much
    as it saved. The spare says it is ready once it runs as a normal process again; a request
    that comes before that is served by forking at once, as the zygote always did. So no
    request waits for an idle-priority process, which a busy guest would starve."""
    preload()
    sock = socket.socket(fileno=ZYGOTE_FD)
    sock.send(b'{"ready": true}')
    spare: socket.socket | None = None  # the zygote's end of the next helper's socket
    ready = False
    handed: socket.socket | None = None  # the same, of the helper last handed a request
    failed = False  # the last spare died before it was ready: the next one after a request
    while True:
        while True:  # middle processes of spares: they exit at once
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if spare is None and handed is None and not failed:
            try:
                spare = _fork_spare(sock)
            except OSError as exc:
                log.warning("zygote: no spare helper: %s", exc)
                failed = True
            else:
                if spare is None:
                    return
                ready = False
        watched = [sock, *([spare] if spare is not None and not ready else []),
                   *([handed] if handed is not None else [])]
        readable, _, _ = select.select(watched, [], [])
        if handed is not None and handed in readable:  # exec'd or gone
            handed.close()
            handed = None
        if spare is not None and spare in readable:
            ready = _spare_said_ready(spare)
            if not ready:
                spare.close()
                spare, failed = None, True
        if sock not in readable:
            continue
        argv, fds, error = _receive(sock)
        if error is None:
            handed_now = ready and _hand_over(spare, argv, fds)
            if ready and spare is not None:
                if handed is not None:
                    handed.close()
                if handed_now:
                    handed = spare
                else:  # it died meanwhile
                    spare.close()
                spare, ready = None, False
            if not handed_now:
                try:
                    if _fork_helper(sock, argv, fds):
                        return
                except OSError as exc:
                    error = str(exc)
        for fd in fds:
            os.close(fd)
        failed = False
        reply = {"ok": True} if error is None else {"error": f"zygote: {error}"}
        sock.send(json.dumps(reply).encode())


def _receive(sock: socket.socket) -> tuple[list[str], list[int], str | None]:
    """The next request: argv, fds, and what is wrong with it. Exits with the agent."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, 65536, HELPER_FDS)
    except OSError:
        os._exit(0)
    if not data:
        os._exit(0)
    try:
        argv = [str(a) for a in json.loads(data)["argv"]]
    except (ValueError, KeyError, TypeError) as exc:
        return [], fds, f"bad request: {exc}"
    if len(fds) != HELPER_FDS:
        return [], fds, f"{len(fds)} fds sent, {HELPER_FDS} needed"
    return argv, fds, None


def _spare_said_ready(spare: socket.socket) -> bool:
    try:
        return spare.recv(64) == SPARE_READY
    except OSError:
        return False


def _hand_over(spare: socket.socket | None, argv: list[str], fds: list[int]) -> bool:
    if spare is None:
        return False
    try:
        socket.send_fds(spare, [json.dumps(argv).encode()], fds)
    except OSError:
        return False
    return True


def _fork_helper(sock: socket.socket, argv: list[str], fds: list[int]) -> bool:
    """Fork a helper for this request now; True in the helper."""
    middle = os.fork()
    if middle == 0:
        try:
            if os.fork() == 0:
                _become_helper(sock, fds, argv)
                return True
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(middle, 0)
    if status != 0:
        raise OSError(f"the helper's fork failed (wait status {status})")
    return False


def _fork_spare(sock: socket.socket) -> socket.socket | None:
    """Start forking a helper that will wait for its request (the zygote does not wait for
    it); the zygote's end of the helper's socket. In the helper this returns None once it
    has its request; if the zygote goes first, the helper exits. The helper is a grandchild,
    so that PID 1 adopts it as if the agent had spawned it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _schedule(os.SCHED_IDLE)
    try:
        middle = os.fork()
    except BaseException:
        _schedule(os.SCHED_OTHER)
        ours.close()
        theirs.close()
        raise
    if middle == 0:
        try:
            helper = os.fork()
        except BaseException:
            os._exit(1)
        if helper != 0:
            os._exit(0)
        try:
            _schedule(os.SCHED_OTHER)
            ours.close()
            _await_request(sock, theirs)
        except BaseException:
            os._exit(1)  # never back into the zygote's loop
        return None
    _schedule(os.SCHED_OTHER)
    theirs.close()
    return ours


def _schedule(policy: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))


def _await_request(zygote: socket.socket, requests: socket.socket) -> None:
    """The spare: says it is ready, then becomes the helper of the request it is handed."""
    os.close(zygote.detach())  # the agent must see the zygote's end close when it exits
    try:
        requests.send(SPARE_READY)
        data, fds, _, _ = socket.recv_fds(requests, 65536, HELPER_FDS)
        argv = [str(a) for a in json.loads(data)]
    except (OSError, ValueError, TypeError):
        os._exit(0)  # the zygote is gone
    if len(fds) != HELPER_FDS:
        os._exit(0)
    _become_helper(None, fds, argv, keep=requests)


def _become_helper(sock: socket.socket | None, fds: list[int], argv: list[str], *,
                   keep: socket.socket | None = None) -> None:
    """`keep`: left open (close-on-exec) above the helper's fds, so that the zygote sees its
    end close once the helper has exec'd its process or died."""
    if sock is not None:
        os.close(sock.detach())
    for target, fd in enumerate(fds):
        os.dup2(fd, target, inheritable=True)
    high = os.sysconf("SC_OPEN_MAX")
    if keep is not None:
        high -= 1
        os.dup2(keep.detach(), high, inheritable=False)
    os.closerange(HELPER_FDS, high)
    sys.argv = ["-c", *argv]


def main() -> None:
    serve()
    from .init import main as helper_main

    helper_main()
