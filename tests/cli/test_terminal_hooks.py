"""Terminal mode through --console-socket (the pty master goes to the caller, window sizes are
forwarded) and the OCI hooks that run on the host, in order, with the state on stdin."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

from .conftest import Runv, reap


def _read_until(fd: int, marker: bytes, timeout_s: float = 60) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout_s
    os.set_blocking(fd, False)
    while marker not in data:
        assert time.monotonic() < deadline, f"no {marker!r} in {data!r}"
        try:
            data += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.05)
    return data


def test_console_socket_tty_and_resize(runv: Runv, tmp_path: Path) -> None:
    def tty(spec: dict[str, Any]) -> None:
        spec["process"]["terminal"] = True

    bundle = runv.bundle(["sh", "-c", "tty; stty size; read x; stty size; exit 4"], edit=tty)
    sock_path = tmp_path / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    pid_file = tmp_path / "init.pid"
    with open(tmp_path / "create.err", "wb") as err:
        proc = runv.popen("create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                          "--console-socket", str(sock_path), "c1",
                          stdout=subprocess.DEVNULL, stderr=err)
    conn, _ = listener.accept()
    _name, fds, _, _ = socket.recv_fds(conn, 4096, 4)
    conn.close()
    listener.close()
    assert len(fds) == 1
    master = fds[0]
    assert proc.wait(timeout=180) == 0, (tmp_path / "create.err").read_text()
    pid = int(pid_file.read_text())
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    runv("start", "c1")
    first = _read_until(master, b"30 100")
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    time.sleep(1)  # the SIGWINCH travels stand-in -> supervisor -> agent
    os.write(master, b"go\n")
    out = first + _read_until(master, b"40 120")
    assert b"/dev/pts/" in out
    assert reap(pid) == 4
    os.close(master)
    runv("delete", "c1")


def test_terminal_needs_a_console_socket(runv: Runv) -> None:
    def tty(spec: dict[str, Any]) -> None:
        spec["process"]["terminal"] = True

    bundle = runv.bundle(["true"], edit=tty)
    result = runv("create", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 1 and b"--console-socket" in result.stderr
    assert runv.leftovers() == []


def _hook(log: Path, kind: str, status: int = 0) -> dict[str, Any]:
    script = f'cat > {log}.{kind}.json; echo {kind} >> {log}; exit {status}'
    return {"path": "/bin/sh", "args": ["sh", "-c", script]}


def test_host_hooks_run_in_order_with_state(runv: Runv, tmp_path: Path) -> None:
    log = tmp_path / "hooks"

    def hooks(spec: dict[str, Any]) -> None:
        spec["hooks"] = {kind: [_hook(log, kind)] for kind in
                         ("prestart", "createRuntime", "poststart", "poststop")}

    bundle = runv.bundle(["true"], edit=hooks)
    runv("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "c1")
    pid = int((tmp_path / "pid").read_text())
    assert log.read_text().split() == ["prestart", "createRuntime"]
    state = json.loads(Path(f"{log}.createRuntime.json").read_text())
    assert state["id"] == "c1" and state["pid"] == pid and state["status"] == "created"
    runv("start", "c1")
    assert log.read_text().split() == ["prestart", "createRuntime", "poststart"]
    assert reap(pid) == 0
    runv("delete", "c1")
    assert log.read_text().split() == ["prestart", "createRuntime", "poststart", "poststop"]
    assert json.loads(Path(f"{log}.poststop.json").read_text())["status"] == "stopped"


def test_failing_prestart_hook_fails_create_and_leaves_nothing(runv: Runv,
                                                               tmp_path: Path) -> None:
    log = tmp_path / "hooks"

    def hooks(spec: dict[str, Any]) -> None:
        spec["hooks"] = {"prestart": [_hook(log, "prestart", status=3)],
                         "poststop": [_hook(log, "poststop")]}

    bundle = runv.bundle(["true"], edit=hooks)
    result = runv("create", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 1
    assert b"hooks.prestart[0]" in result.stderr and b"status 3" in result.stderr
    assert log.read_text().split() == ["prestart"]
    assert runv.leftovers() == []
