"""Checkpoint, restore and fork of running sandboxes in real VMs (docs/snapshots.md): a
process counting in memory keeps its count across a checkpoint and a restore (and its output
reaches the restored container's log), a checkpoint with --leave-running keeps the container
going, the original and its restore diverge and each has its own identity (hostname, random
stream, boot id, clock), a restored sandbox is saved again, two API forks diverge, and a
sandbox with a host volume is refused with one line."""

from __future__ import annotations

import json
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


def _until_ticks(hyperctl: Hyperctl, name: str, at_least: int, timeout_s: float = 60
                 ) -> list[int]:
    """The container's log once it has `at_least` ticks (a restored one's output comes once
    its supervisor has attached to the process again)."""
    deadline = time.monotonic() + timeout_s
    while len(ticks := _ticks(hyperctl, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} logged only {ticks}"
        time.sleep(0.3)
    return ticks


def _until_audited(hyperctl: Hyperctl, name: str, argv: list[str], timeout_s: float = 60
                   ) -> None:
    """Until the container's audit has the exec of `argv`: by its argv, or, for a process
    gone before the agent read it (complete: false), by the task's name (docs/ci.md)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = hyperctl("events", "--format", "json", name).stdout.decode()
        execs = [r for r in map(json.loads, out.splitlines()) if r.get("role") == "exec"]
        if any(r["argv"] == argv or (not r["complete"] and r["comm"] == argv[0])
               for r in execs):
            return
        assert time.monotonic() < deadline, f"{name}'s audit has no {argv}: {execs}"
        time.sleep(1)


def test_a_count_in_memory_survives_checkpoint_and_restore(hyperctl: Hyperctl,
                                                           tmp_path: Path) -> None:
    hyperctl("run", "-d", "--name", "base", "--rootfs", "block", "busybox", "sh", "-c", COUNTER)
    _until_count(hyperctl, "base", 3)
    # Its output reaches its log before the save (else the saved guest holds output from
    # tick 1 on, which its restore would log: seen when a starved guest's stream failed).
    _until_ticks(hyperctl, "base", 3)
    hyperctl("exec", "base", "sh", "-c", "echo shared > /file")
    snapshot = tmp_path / "snap"
    result = hyperctl("checkpoint", "base", "--leave-running", "-o", str(snapshot))
    assert "checkpointed base into" in result.stderr.decode()
    files = {p.name for p in snapshot.iterdir()}
    assert {"memory", "state", "vm.json", "sandbox.json", "workload.json"} <= files, files
    # With --leave-running the original runs on: it counts, its log goes on, exec works.
    moved = _count(hyperctl, "base")
    _until_count(hyperctl, "base", moved + 2)
    _until_ticks(hyperctl, "base", moved + 2)   # lines written after the save among them

    hyperctl("restore", str(snapshot), "--name", "again")
    # The shell's own variable carried on from where it was saved (no restart from 1), and
    # its output comes to the restored container's log.
    ticks = _until_ticks(hyperctl, "again", 3)
    assert 3 <= ticks[0] <= moved + 1, (ticks[:3], moved)
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    assert hyperctl("exec", "again", "cat", "/proc/1/cmdline").stdout.startswith(b"sh\0-c\0")
    # Its guest reports processes under the saved container's id: the audit has them as its.
    _until_audited(hyperctl, "again", ["cat", "/proc/1/cmdline"])

    # The two diverge from there: disk, memory, and an identity each.
    hyperctl("exec", "again", "sh", "-c", "echo mine > /file; echo again > /dev/shm/mark")
    probe = ("cat /file; hostname; cat /proc/sys/kernel/random/uuid; "
             "cat /proc/sys/kernel/random/boot_id; date +%s; cat /dev/shm/mark || echo none")
    seen = {}
    for name in ("again", "base"):
        seen[name] = hyperctl("exec", name, "sh", "-c", probe).stdout.decode().split()
        assert abs(int(seen[name][4]) - time.time()) < 30, seen   # the host's clock
    assert [seen["again"][i] for i in (0, 1, 5)] == ["mine", "again", "again"], seen
    assert [seen["base"][i] for i in (0, 1, 5)] == ["shared", "base", "none"], seen
    assert seen["again"][2] != seen["base"][2] and seen["again"][3] != seen["base"][3]

    # A restored sandbox is saved again; without --leave-running it stops, as if killed.
    hyperctl("checkpoint", "again", "-o", str(tmp_path / "snap2"))
    assert hyperctl("wait", "again").stdout == b"137\n"
    assert (tmp_path / "snap2" / "memory").is_file()
    hyperctl("rm", "-f", "base", "again")


def test_a_host_volume_is_refused_with_one_line(hyperctl: Hyperctl, tmp_path: Path) -> None:
    hyperctl("run", "-d", "--name", "vol", "--rootfs", "block", "-v", f"{tmp_path}:/data",
             "busybox", "sleep", "600")
    result = hyperctl("checkpoint", "vol", "-o", str(tmp_path / "s1"), check=False)
    err = result.stderr.decode().strip()
    assert result.returncode != 0 and len(err.splitlines()) == 1, err
    assert "host directories mounted (volumes)" in err and "9p or virtio-fs" in err, err
    assert not (tmp_path / "s1").exists()
    assert hyperctl("exec", "vol", "true").returncode == 0   # it goes on as it was
    result = hyperctl("restore", str(tmp_path), check=False)
    assert result.returncode != 0 and "not a hyperctl checkpoint" in result.stderr.decode()
    hyperctl("rm", "-f", "vol")


def test_api_fork_gives_sandboxes_that_go_their_own_ways(roots: Hyperctl) -> None:  # noqa: F811
    with Sandbox.create("busybox", rootfs="block", timeout=600) as box:
        # Written by commands, not write_file(): what is proved here is the forks' state.
        box.run(["sh", "-c", "echo warmed > /dev/shm/state; echo prepared > /work.txt"],
                check=True)
        forks = box.fork(2)
        try:
            for i, fork in enumerate(forks):
                assert fork.read_file("/dev/shm/state") == b"warmed\n"
                fork.run(["sh", "-c", f"echo fork {i} | tee /work.txt > /dev/shm/state"],
                         check=True)
            assert [f.read_file("/work.txt") for f in forks] == [b"fork 0\n", b"fork 1\n"]
            assert [f.read_file("/dev/shm/state") for f in forks] == [b"fork 0\n", b"fork 1\n"]
            assert box.read_file("/dev/shm/state") == b"warmed\n"
            assert box.read_file("/work.txt") == b"prepared\n"
            names = {f.run(["hostname"]).stdout for f in forks}
            assert len(names) == 2 and box.run(["hostname"]).stdout not in names
        finally:
            for fork in forks:
                fork.close()
    assert roots("ps", "-a", "-q").stdout == b""
    assert not list((roots.data / "snapshots").iterdir())
