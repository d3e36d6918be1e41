"""runv-vsock's command line: bad input is one clear line and a non-zero exit, nothing left."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize(("args", "message"), [
    (["--cid", "2"], "--cid 2: use 3 to 4294967294"),
    (["--forward", "nowhere"], "--forward 'nowhere': want PATH=PORT"),
    (["--forward", "/x=port"], "--forward '/x=port': want PATH=PORT"),
    (["--qemu-pid=1", "--qemu-pid-file=/x"], "--qemu-pid and --qemu-pid-file exclude each other"),
])
def test_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runv_py.vsock", f"--socket={tmp_path}/v.sock",
         f"--uds={tmp_path}/u.sock", *args],
        check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unusable_socket_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runv_py.vsock", f"--socket={tmp_path}/no/such/v.sock",
         f"--uds={tmp_path}/u.sock"], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on {tmp_path}/no/such/v.sock: No such file or directory" in result.stderr


def test_a_later_unusable_path_removes_the_earlier_sockets(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runv_py.vsock", f"--socket={tmp_path}/v.sock",
         f"--uds={tmp_path}/u.sock", f"--forward={tmp_path}/no/such/a.sock=1024"],
        check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"cannot listen on {tmp_path}/no/such/a.sock" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_kernel_vsock_is_not_chosen_without_a_usable_device(tmp_path: Path) -> None:
    from runv_py.vsock import kernel

    assert kernel.claim_cid(tmp_path / "vhost-vsock") is None  # missing
    (tmp_path / "not-a-device").write_bytes(b"")
    assert kernel.claim_cid(tmp_path / "not-a-device") is None  # the ioctl fails
    if not kernel.DEVICE.exists():
        assert kernel.claim_cid() is None  # these hosts: our backend serves vsock


def _sockets(pid: str) -> int:
    """How many sockets `pid` holds beside stdio."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            count += int(fd.name) > 2 and os.readlink(fd).startswith("socket:")
    return count


def test_the_worker_dies_with_its_keeper(tmp_path: Path) -> None:
    keeper = subprocess.Popen(
        [sys.executable, "-m", "runv_py.vsock", f"--socket={tmp_path}/v.sock",
         f"--uds={tmp_path}/u.sock"], stderr=subprocess.DEVNULL)
    try:
        children = Path(f"/proc/{keeper.pid}/task/{keeper.pid}/children")
        deadline = time.monotonic() + 30
        while not children.read_text().split():
            assert time.monotonic() < deadline, "no worker"
            time.sleep(0.01)
        [worker] = children.read_text().split()
        # once started, the worker holds the sockets it serves, not the keeper's end of the
        # journal: vhost-user and hybrid listeners, its end of the journal
        while _sockets(worker) != 3:
            assert time.monotonic() < deadline, "the worker holds other sockets"
            time.sleep(0.01)
    finally:
        keeper.kill()
        keeper.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists():
        assert time.monotonic() < deadline, "the worker outlived its keeper"
        time.sleep(0.01)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_clear_cut_short_by_a_signal_closes_nothing_twice(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The keeper's SIGTERM handler raises SystemExit between two closes of Journal.clear()
    (seen when closing the last fd of a big guest's memory, which frees it, took long);
    stop() clears again and closed the first fds a second time: EBADF, and stop() ended
    before removing the sockets (or, with the number reused meanwhile, closed another fd)."""
    from runv_py.vsock import journal
    from runv_py.vsock import protocol as vu

    kept = journal.Journal()
    fds = [os.eventfd(0) for _ in range(3)]
    kept.add(journal.CONN, b"", [fds[0]])
    for request, fd in ((vu.SET_MEM_TABLE, fds[1]), (vu.SET_OWNER, fds[2])):
        kept.add(journal.MESSAGE, vu.HEADER.pack(request, vu.VERSION, 0), [fd])
    real_close = os.close
    closed: list[int] = []

    def close_then_signal(fd: int) -> None:
        closed.append(fd)
        real_close(fd)
        raise SystemExit(0)

    monkeypatch.setattr(journal.os, "close", close_then_signal)
    with pytest.raises(SystemExit):
        kept.clear()
    monkeypatch.setattr(journal.os, "close", real_close)
    try:
        kept.clear()  # what stop() does next
        assert kept.conn_fd == -1 and not kept.records
        assert closed == [fds[0]]
    finally:
        for fd in fds[1:]:
            with contextlib.suppress(OSError):
                real_close(fd)


def test_stop_removes_the_sockets_even_when_clearing_fails(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from runv_py.vsock import keeper as keeper_mod

    keeper = keeper_mod.Keeper(keeper_mod.parse_args(
        [f"--socket={tmp_path}/v.sock", f"--uds={tmp_path}/u.sock"]))
    try:
        def fail() -> None:
            raise OSError(9, "Bad file descriptor")

        monkeypatch.setattr(keeper.journal, "clear", fail)
        with pytest.raises(OSError):
            keeper.stop()
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        for sock in (keeper.vhost, keeper.hybrid, keeper.ours, keeper.theirs):
            sock.close()


def test_a_sigterm_while_the_keeper_forks_its_worker_stops_it(tmp_path: Path) -> None:
    """The owner stops a backend as soon as it needs to, which under load (a template clone
    that failed to restore) is while the keeper still forks its first worker. A SIGTERM then
    ran the keeper's handler inside an at-fork hook, which swallowed its SystemExit: the
    keeper ignored the SIGTERM and was killed after the owner's 5 s. Here the signal comes
    from an at-fork hook of the keeper's own, every time."""
    program = ("import os, signal, sys\n"
               "from runv_py.vsock import keeper\n"
               "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), "
               "signal.SIGTERM))\n"
               "sys.exit(keeper.main(sys.argv[1:]))\n")
    keeper = subprocess.Popen(
        [sys.executable, "-c", program, f"--socket={tmp_path}/v.sock", f"--uds={tmp_path}/u.sock",
         f"--log={tmp_path}/log"], stderr=subprocess.PIPE, text=True)
    try:
        code = keeper.wait(timeout=20)
    except subprocess.TimeoutExpired:
        keeper.kill()
        keeper.wait()
        pytest.fail("the keeper ignored a SIGTERM that came while it forked its worker")
    finally:
        assert keeper.stderr is not None
        stderr = keeper.stderr.read()
        keeper.stderr.close()
    assert code == 0, stderr
    assert "Exception ignored" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_each_backend_draws_its_own_host_ports(tmp_path: Path) -> None:
    """A guest restored from a snapshot still holds its saved VM's connections for seconds
    (reset, not yet closed), and it resets a REQUEST on one of their 4-tuples: the restored
    VM's backend, counting host ports from the same start, met them (a restored container's
    exec got 'the guest refused port 1025' and its output was lost)."""
    import selectors

    from runv_py.vsock import keeper
    from runv_py.vsock.device import FIRST_HOST_PORT, GENERATION_PORTS, Device

    bases = []
    for name in ("a", "b"):
        k = keeper.Keeper(keeper.parse_args([f"--socket={tmp_path}/{name}-v.sock",
                                             f"--uds={tmp_path}/{name}-u.sock"]))
        bases.append(k.port_base)
        for sock in (k.vhost, k.hybrid, k.ours, k.theirs):
            sock.close()
    assert bases[0] != bases[1]
    device = Device(3, tmp_path / "u.sock", selectors.DefaultSelector(),
                    port_base=bases[0], generation=1)
    assert device.next_host_port == FIRST_HOST_PORT + (bases[0] + GENERATION_PORTS) % (1 << 30)
