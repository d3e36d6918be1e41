"""Checkpoint, restore and fork of running sandboxes in real VMs (docs/snapshots.md): a
process counting in memory keeps its count across a checkpoint and a restore (and its output
reaches the restored container's log), a checkpoint with --leave-running keeps the container
going, two restores of one snapshot diverge and each has its own identity (hostname, random
stream, boot id, clock), and what cannot be saved is refused with one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runv_py.api import Sandbox
from tests.hyperctl.conftest import Hyperctl
from tests.hyperctl.test_api import roots  # noqa: F401 (fixture)

pytestmark = pytest.mark.vm

# The count is renamed into place: a reader never sees it half written.
COUNTER = ("i=0; while :; do i=$((i+1)); echo $i > /dev/shm/next; mv /dev/shm/next "
           "/dev/shm/count; echo tick $i; sleep 0.2; done")


def _count(hyperctl: Hyperctl, name: str) -> int:
    return int(hyperctl("exec", name, "cat", "/dev/shm/count").stdout)


def _until_count(hyperctl: Hyperctl, name: str, at_least: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while (count := _count(hyperctl, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} counts no further than {count}"
        time.sleep(0.3)
    return count


def _ticks(hyperctl: Hyperctl, name: str) -> list[int]:
    return [int(line.split()[1]) for line in hyperctl("logs", name).stdout.decode().splitlines()]


def test_a_count_in_memory_survives_checkpoint_and_restore(hyperctl: Hyperctl,
                                                           tmp_path: Path) -> None:
    hyperctl("run", "-d", "--name", "counter", "busybox", "sh", "-c", COUNTER)
    before = _until_count(hyperctl, "counter", 5)
    snapshot = tmp_path / "snap"
    result = hyperctl("checkpoint", "counter", "-o", str(snapshot))
    assert "checkpointed counter into" in result.stderr.decode()
    # Without --leave-running the container stops, as if killed.
    assert hyperctl("wait", "counter").stdout == b"137\n"
    last_tick = _ticks(hyperctl, "counter")[-1]
    assert last_tick >= before
    files = {p.name for p in snapshot.iterdir()}
    assert {"memory", "state", "vm.json", "sandbox.json", "workload.json"} <= files, files

    hyperctl("restore", str(snapshot), "--name", "again")
    after = _until_count(hyperctl, "again", last_tick + 3)
    ticks = _ticks(hyperctl, "again")
    # The shell's own variable carried on: no restart from 1, and its output comes here.
    assert ticks and ticks[0] >= last_tick and ticks == list(range(ticks[0], ticks[-1] + 1))
    assert after > last_tick
    assert hyperctl("exec", "again", "cat", "/proc/1/cmdline").stdout.startswith(b"sh\0-c\0")
    assert hyperctl("exec", "again", "hostname").stdout == b"again\n"
    hyperctl("rm", "-f", "counter", "again")


def test_leave_running_and_two_restores_that_diverge(hyperctl: Hyperctl,
                                                      tmp_path: Path) -> None:
    hyperctl("run", "-d", "--name", "base", "busybox", "sh", "-c", COUNTER)
    _until_count(hyperctl, "base", 3)
    hyperctl("exec", "base", "sh", "-c", "echo shared > /file")
    snapshot = tmp_path / "snap"
    hyperctl("checkpoint", "base", "--leave-running", "-o", str(snapshot))
    # The original runs on: it counts, its log goes on, exec works.
    moved = _count(hyperctl, "base")
    _until_count(hyperctl, "base", moved + 3)
    assert _ticks(hyperctl, "base")[-1] >= moved + 2

    for name in ("one", "two"):
        hyperctl("restore", str(snapshot), "--name", name)
    hyperctl("exec", "one", "sh", "-c", "echo mine > /file; echo one > /dev/shm/mark")
    probe = ("cat /file; hostname; cat /proc/sys/kernel/random/uuid; "
             "cat /proc/sys/kernel/random/boot_id; date +%s")
    seen = {}
    for name in ("one", "two", "base"):
        lines = hyperctl("exec", name, "sh", "-c", probe).stdout.decode().split()
        seen[name] = lines
        assert abs(int(lines[4]) - time.time()) < 30, lines   # the host's clock, not the saved
    assert (seen["one"][0], seen["two"][0], seen["base"][0]) == ("mine", "shared", "shared")
    assert (seen["one"][1], seen["two"][1], seen["base"][1]) == ("one", "two", "base")
    assert len({seen[n][2] for n in seen}) == 3 and len({seen[n][3] for n in seen}) == 3
    # Memory diverged too, and each restored counter carries on by itself.
    marks = [hyperctl("exec", n, "cat", "/dev/shm/mark", check=False).stdout
             for n in ("one", "two")]
    assert marks == [b"one\n", b""], marks
    for name in ("one", "two"):
        _until_count(hyperctl, name, _count(hyperctl, name) + 2)
    hyperctl("rm", "-f", "base", "one", "two")


def test_what_cannot_be_saved_is_refused_with_one_line(hyperctl: Hyperctl,
                                                       tmp_path: Path) -> None:
    hyperctl("run", "-d", "--name", "vol", "-v", f"{tmp_path}:/data", "busybox", "sleep", "600")
    result = hyperctl("checkpoint", "vol", "-o", str(tmp_path / "s1"), check=False)
    err = result.stderr.decode().strip()
    assert result.returncode != 0 and len(err.splitlines()) == 1, err
    assert "host directories mounted" in err and "9p or virtio-fs" in err, err
    hyperctl("run", "-d", "--name", "shared", "--rootfs", "shared", "busybox", "sleep", "600")
    result = hyperctl("checkpoint", "shared", "-o", str(tmp_path / "s2"), check=False)
    assert result.returncode != 0 and "--rootfs shared" in result.stderr.decode()
    # Both go on as they were.
    for name in ("vol", "shared"):
        assert hyperctl("exec", name, "true").returncode == 0
    result = hyperctl("restore", str(tmp_path), check=False)
    assert result.returncode != 0 and "not a hyperctl checkpoint" in result.stderr.decode()
    hyperctl("rm", "-f", "vol", "shared")


def test_api_fork_gives_sandboxes_that_go_their_own_ways(roots: Hyperctl) -> None:  # noqa: F811
    with Sandbox.create("busybox", timeout=600) as box:
        box.write_file("/dev/shm/state", b"warmed\n")
        box.run(["sh", "-c", "echo prepared > /work.txt"], check=True)
        forks = box.fork(2)
        try:
            for i, fork in enumerate(forks):
                assert fork.read_file("/dev/shm/state") == b"warmed\n"
                fork.write_file("/work.txt", f"fork {i}\n".encode())
            assert [f.read_file("/work.txt") for f in forks] == [b"fork 0\n", b"fork 1\n"]
            assert box.read_file("/work.txt") == b"prepared\n"
            names = {f.run(["hostname"]).stdout for f in forks}
            assert len(names) == 2 and box.run(["hostname"]).stdout not in names
        finally:
            for fork in forks:
                fork.close()
    assert roots("ps", "-a", "-q").stdout == b""
    assert not list((roots.data / "snapshots").iterdir())
