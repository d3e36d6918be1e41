"""Logic of the guest agent that runs without a VM: options and the channel splice."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hyperstart_agent import channel, options


def test_options_from_kernel_cmdline() -> None:
    opts = options.parse("console=ttyS0 hyperstart.channel=serial:foo.0 hyperstart.debug=1 quiet")
    assert opts.channel_kind == "serial" and opts.channel_name == "foo.0" and opts.debug
    both = options.parse("hyperstart.channel=serial:agent.channel.0,vsock:1024")
    assert both.channels == [("serial", "agent.channel.0"), ("vsock", "1024")]
    assert options.parse("quiet") == options.Options()
    assert options.unknown_keys("hyperstart.channel=x hyperstart.bogus=1") == ["hyperstart.bogus"]


def test_find_serial_port_by_name(tmp_path: Path) -> None:
    for entry, name in (("vport0p0", "other"), ("vport0p1", "agent.channel.0")):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name + "\n")
    assert channel.find_serial_port("agent.channel.0", str(tmp_path)) == "/dev/vport0p1"
    with pytest.raises(channel.ChannelError, match="missing"):
        channel.find_serial_port("missing", str(tmp_path))


def test_pump_copies_both_ways_and_ends_when_the_host_leaves() -> None:
    host, port = socket.socketpair()       # stands in for the serial port
    server, inner = socket.socketpair()    # the agent's connection to its gRPC server
    port.setblocking(False)
    inner.setblocking(False)
    done = threading.Event()

    def run() -> None:
        channel._pump(port.fileno(), inner)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    payload = os.urandom(3 * 1024 * 1024)
    sender = threading.Thread(target=host.sendall, args=(payload,))
    sender.start()
    got = bytearray()
    while len(got) < len(payload):
        got += server.recv(1 << 20)
    sender.join()
    assert bytes(got) == payload
    server.sendall(b"reply")
    assert host.recv(16) == b"reply"
    host.close()
    assert done.wait(5), "pump did not notice the host going away"
    for s in (port, server, inner):
        s.close()


def test_wait_host_returns_at_once_for_an_attached_host() -> None:
    splice = channel.SerialSplice("agent.channel.0", "/nonexistent")
    host, port = socket.socketpair()       # a host that is attached (no POLLHUP)
    server, inner = socket.socketpair()    # the agent's connection to its gRPC server
    assert splice._wait_host(port.fileno(), inner, bytearray()) is True
    for s in (host, port, server, inner):
        s.close()


def _wakeups(tid: int) -> int:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches:")))


def test_wait_host_sleeps_while_no_host_is_attached_and_keeps_what_the_server_sent() -> None:
    """A port without a host polls POLLHUP for as long as no host comes (a template clone's
    serial port, its whole life): the wait must not wake for it (an idle guest's CPU)."""
    splice = channel.SerialSplice("agent.channel.0", "/nonexistent")
    host, port = socket.socketpair()
    server, inner = socket.socketpair()
    host.close()    # the port now polls POLLHUP, as a virtio port without a host
    early = bytearray()
    result: list[bool] = []
    tid: list[int] = []

    def wait() -> None:
        tid.append(threading.get_native_id())
        result.append(splice._wait_host(port.fileno(), inner, early))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    before = _wakeups(tid[0])
    time.sleep(0.5)
    assert waiter.is_alive() and _wakeups(tid[0]) - before <= 2, "woke while no host came"
    server.sendall(b"server-preface")
    server.close()  # the server drops the connection while no host is there yet
    waiter.join(5)
    assert result == [False] and bytes(early) == b"server-preface"
    for s in (port, inner):
        s.close()


def test_vsock_connections_find_their_server_connection_made_already(tmp_path: Path) -> None:
    server_path = str(tmp_path / "server.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(server_path)
    server.listen(8)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # stands in for AF_VSOCK
    listener.bind(str(tmp_path / "vsock.sock"))
    listener.listen(8)
    splice = channel.VsockSplice(1024, server_path)
    serving = threading.Thread(target=splice.serve, args=(listener,), daemon=True)
    serving.start()
    server.settimeout(5)
    first, _ = server.accept()  # before any host connection
    first.sendall(b"server-preface")
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(str(tmp_path / "vsock.sock"))
    host.settimeout(5)
    assert host.recv(64) == b"server-preface"
    host.sendall(b"request")
    first.settimeout(5)
    assert first.recv(64) == b"request"
    second, _ = server.accept()  # the next connection's, made ahead again
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() the splice waits in
    for s in (host, first, second, server, listener):
        s.close()
    serving.join(5)
    assert not serving.is_alive(), "the splice kept serving a closed listener"


def test_the_zygote_imports_every_module_a_helper_imports_late() -> None:
    """An import inside a helper's function runs in every container and exec the zygote
    forks (tens of ms each under TCG): the zygote must have made it already."""
    import ast
    import subprocess
    import sys

    from hyperstart_agent.container import init

    late = set()
    for node in ast.walk(ast.parse(Path(init.__file__).read_text())):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.level == 1:
                    late |= {f"hyperstart_agent.container.{alias.name}" for alias in inner.names}
                elif isinstance(inner, ast.Import):
                    late |= {alias.name for alias in inner.names}
    assert "hyperstart_agent.container.seccomp" in late  # what the scan is for
    script = ("import sys; from hyperstart_agent.container import zygote; zygote.preload(); "
              "print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                            text=True, timeout=60).stdout.split()
    assert sorted(late - set(loaded)) == []


def test_a_seccomp_profile_is_compiled_once_while_it_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperstart_agent.container import seccomp

    compiled: list[object] = []
    real = seccomp.compile_filter

    def counting(profile: seccomp.Profile) -> seccomp.Filter:
        compiled.append(profile)
        return real(profile)

    monkeypatch.setattr(seccomp, "compile_filter", counting)
    seccomp.compiled.cache_clear()

    def filter_of(errno_ret: int) -> seccomp.Filter:
        parsed = seccomp.parse({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno_ret}]})
        assert parsed is not None
        return seccomp.compiled(parsed)

    first = filter_of(1)
    assert filter_of(1) is first and len(compiled) == 1
    assert seccomp.Filter.decode(first.encode()) == first and len(first.program) % 8 == 0
    for errno_ret in range(2, seccomp.KEPT + 2):  # the first one is pushed out
        filter_of(errno_ret)
    assert len(compiled) == seccomp.KEPT + 1
    filter_of(1)
    assert len(compiled) == seccomp.KEPT + 2
    with pytest.raises(ValueError):
        seccomp.Filter.decode(b"\0\0\0\0abc")
    seccomp.compiled.cache_clear()
