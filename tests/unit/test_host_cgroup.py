"""The host cgroup of a sandbox (sandbox/host_cgroup.py): the limits derived from a spec, the
files they go to in v1 and v2 hierarchies, cgroupsPath in its three forms; and, on this host's
real hierarchies, creation, joining and removal (one owner, nothing left)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runv_py.errors import SpecError
from runv_py.sandbox import cgroup, host_cgroup, vm_dir
from runv_py.sandbox.host_cgroup import Limits, limit_files, limits, resolve


def test_limits_from_a_spec() -> None:
    resources = {"cpu": {"quota": 50000, "period": 100000, "shares": 2048, "cpus": "0",
                         "mems": "0"}, "pids": {"limit": 1000}, "memory": {"limit": 1 << 27}}
    got = limits(resources, 384, tcg=False)
    assert got == Limits(memory_bytes=(384 + host_cgroup.HOST_OVERHEAD_MIB) << 20,
                         cpu_quota_us=50000, cpu_period_us=100000, cpu_shares=2048,
                         cpuset_cpus="0", cpuset_mems="0", pids=1000)
    # TCG adds QEMU's translation cache; a tiny pids limit stays inside the guest.
    small = limits({"pids": {"limit": 10}}, 256, tcg=True)
    assert small.memory_bytes == (256 + host_cgroup.HOST_OVERHEAD_MIB
                                  + host_cgroup.TCG_CODE_CACHE_MIB) << 20
    assert small.pids == host_cgroup.PIDS_FLOOR and small.cpu_quota_us is None
    # Unlimited (-1) stays unlimited; a quota without a period gets the default period.
    assert limits({"pids": {"limit": -1}, "cpu": {"quota": -1}}, 256, tcg=False).pids is None
    assert limits({"cpu": {"quota": 150000}}, 256, tcg=False).cpu_period_us is None


@pytest.mark.parametrize(("resources", "field"), [
    ({"cpu": {"quota": "1"}}, "linux.resources.cpu.quota"),
    ({"cpu": {"period": 10}}, "linux.resources.cpu.period"),
    ({"cpu": {"cpus": "0;rm"}}, "linux.resources.cpu.cpus"),
    ({"pids": []}, "linux.resources.pids"),
])
def test_bad_resources_name_the_field(resources: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError, match=f"^{field.replace('.', '[.]')}"):
        limits(resources, 256, tcg=False)


def test_limit_files_v1_and_v2() -> None:
    lim = Limits(memory_bytes=1 << 30, cpu_quota_us=150000, cpu_period_us=100000,
                 cpu_shares=1024, cpuset_cpus="0-1", pids=300)
    assert limit_files("memory", lim, frozenset()) == [("memory.limit_in_bytes", "1073741824")]
    assert limit_files("cpu,cpuacct", lim, frozenset()) == [
        ("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "150000"), ("cpu.shares", "1024")]
    assert limit_files("cpuset", lim, frozenset()) == [("cpuset.cpus", "0-1")]
    assert limit_files("pids", lim, frozenset()) == [("pids.max", "300")]
    assert limit_files("freezer", lim, frozenset()) == []
    assert limit_files("", lim, frozenset()) == [
        ("memory.max", "1073741824"), ("cpu.max", "150000 100000"), ("cpu.weight", "39"),
        ("cpuset.cpus", "0-1"), ("pids.max", "300")]
    # On a hybrid host the v2 hierarchy serves only what no v1 hierarchy has.
    assert limit_files("", lim, frozenset({"memory", "cpu", "cpuset", "pids"})) == []


def test_cgroups_path_forms() -> None:
    base = {"memory": "/runtime", "": "/"}
    assert resolve("/kubepods/pod1/c1", base, "memory") == "/kubepods/pod1/c1"
    assert resolve("rel/c1", base, "memory") == "/runtime/rel/c1"
    assert resolve("rel", base, "") == "/rel"
    assert resolve("machine-pods.slice:libpod:abc", base, "memory") == \
        "/machine.slice/machine-pods.slice/libpod-abc.scope"
    assert resolve(":cri:abc", base, "") == "/system.slice/cri-abc.scope"
    assert resolve("-.slice::abc", base, "") == "/abc.scope"
    assert resolve("system.slice:p:sub-x.slice", base, "") == "/system.slice/sub-x.slice"
    for bad in ("/a/../b", "a-.slice:p:n", "x:p:", "bad:p:n"):
        with pytest.raises(SpecError, match=r"^linux\.cgroupsPath"):
            resolve(bad, base, "")


def _spawn_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_create_join_and_remove_on_this_host(tmp_path: Path) -> None:
    """Every mounted hierarchy (this host: v1 controllers, name=systemd, v2 unified) gets the
    cgroup with its limits; remove() leaves nothing."""
    name = f"runv-unit-{os.getpid()}"
    record = tmp_path / host_cgroup.RECORD
    origin = cgroup.memberships()
    roots = cgroup.roots(origin)
    lim = Limits(memory_bytes=512 << 20, cpu_quota_us=20000, cpu_period_us=100000,
                 cpu_shares=512, pids=300)
    sleeper = _spawn_sleeper()
    try:
        host = host_cgroup.HostCgroup.create(f"/{name}/sandbox", lim, origin, record)
        host.join([sleeper.pid])
        assert record.exists()
        placed = cgroup.memberships(sleeper.pid)
        assert set(placed) == set(roots)
        for controllers, path in placed.items():
            assert path == f"/{name}/sandbox", (controllers, path)
        for controllers, root in roots.items():
            directory = root / name / "sandbox"
            names = set(controllers.split(","))
            if "memory" in names:
                assert (directory / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
            if "cpu" in names:
                assert (directory / "cpu.cfs_quota_us").read_text().strip() == "20000"
                assert (directory / "cpu.shares").read_text().strip() == "512"
            if "pids" in names:
                assert (directory / "pids.max").read_text().strip() == "300"
        sleeper.kill()
        sleeper.wait()
        host.remove()
        assert cgroup.memberships() == origin
        assert not record.exists()
        for root in roots.values():
            assert not (root / name).exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        for root in roots.values():
            for leftover in (root / name / "sandbox", root / name):
                if leftover.exists():
                    leftover.rmdir()


@contextmanager
def _killed_owner(name: str, record: Path, then: str = "") -> Iterator[list[Path]]:
    """A process that makes cgroup `/name` (its record at `record`), joins it, runs the
    Python statement `then`, and is SIGKILLed; yields the hierarchies' roots and removes
    whatever of the cgroup is left at the end."""
    script = (f"import os, time; from pathlib import Path; "
              f"from runv_py.sandbox import cgroup, vm_dir, host_cgroup as h; "
              f"c = h.HostCgroup.create('/{name}', h.Limits(pids=300), cgroup.memberships(), "
              f"Path({str(record)!r})); c.join([os.getpid()]); {then or 'pass'}; "
              f"print('in', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    roots = list(cgroup.roots(cgroup.memberships()).values())
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"in\n"
        assert all((root / name).is_dir() for root in roots)
        owner.kill()
        owner.wait()
        yield roots
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for root in roots:
            if (root / name).exists():
                (root / name).rmdir()


def _until_gone(name: str, roots: list[Path]) -> None:
    deadline = time.monotonic() + 5
    while any((root / name).exists() for root in roots):
        assert time.monotonic() < deadline, "cgroup left behind"
        time.sleep(0.05)


def test_a_killed_owner_leaves_a_record_that_removes_it(tmp_path: Path) -> None:
    """What `runv delete` does after a SIGKILLed supervisor: remove_recorded() moves stray
    processes out and removes the recorded directories."""
    name = f"runv-unit-k{os.getpid()}"
    record = tmp_path / host_cgroup.RECORD
    with _killed_owner(name, record) as roots:
        host_cgroup.remove_recorded(record)
        assert not record.exists()
        _until_gone(name, roots)


def test_a_supervisor_killed_after_emptying_its_vm_directory_leaves_the_record(
        tmp_path: Path) -> None:
    """A supervisor ending empties its VM directory (its VM closed) before it removes its
    host cgroup; SIGKILLed in between (the soak did it during an API sandbox's close), the
    deleter's vm_dir.remove() must still find the cgroup's record there."""
    name = f"runv-unit-e{os.getpid()}"
    (tmp_path / vm_dir.OWNER).write_text("1 1")
    with _killed_owner(name, tmp_path / host_cgroup.RECORD,
                       f"vm_dir.empty(Path({str(tmp_path)!r}))") as roots:
        vm_dir.remove(tmp_path)
        assert not tmp_path.exists()
        _until_gone(name, roots)


def test_io_weight_goes_to_the_weight_file_the_io_scheduler_has() -> None:
    lim = limits({"blockIO": {"weight": 500}}, 256, tcg=False)
    assert lim.io_weight == 500
    with pytest.raises(SpecError, match=r"^linux\.resources\.blockIO\.weight"):
        limits({"blockIO": {"weight": 5000}}, 256, tcg=False)
    lim = Limits(io_weight=500)
    # v1: BFQ's file when the host's scheduler is BFQ, else the generic one
    assert limit_files("blkio", lim, frozenset(), lambda n: n == "blkio.bfq.weight") == [
        ("blkio.bfq.weight", "500")]
    assert limit_files("blkio", lim, frozenset(), lambda n: n == "blkio.weight") == [
        ("blkio.weight", "500")]
    # neither (mq-deadline, none): the generic name, which the caller finds missing
    assert limit_files("blkio", lim, frozenset(), lambda n: False) == [("blkio.weight", "500")]
    # v2: io.bfq.weight takes the value as it is, io.weight on its own scale (runc's)
    assert limit_files("", lim, frozenset(), lambda n: n == "io.bfq.weight") == [
        ("io.bfq.weight", "500")]
    assert limit_files("", lim, frozenset(), lambda n: n == "io.weight") == [
        ("io.weight", str(host_cgroup.io_weight_v2(500)))]
    assert (host_cgroup.io_weight_v2(10), host_cgroup.io_weight_v2(1000)) == (1, 10000)
    # hybrid: a v1 blkio hierarchy serves it, not v2
    assert limit_files("", lim, frozenset({"blkio"})) == []


def test_io_weight_is_written_where_the_host_cgroup_has_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create() on a hierarchy whose cgroup offers a weight file (a BFQ host: this one's disks
    use mq-deadline, whose cgroups have none) writes the weight there."""
    blkio, v2 = tmp_path / "blkio", tmp_path / "unified"
    for directory, name in ((blkio / "hyperctl" / "t" / "c", "blkio.bfq.weight"),
                            (v2 / "hyperctl" / "t" / "c", "io.weight")):
        directory.mkdir(parents=True)
        (directory / name).write_text("100\n")
    for root in (blkio, v2):
        (root / "hyperctl" / "t" / "c" / "cgroup.procs").write_text("")
    hierarchies = {"blkio": blkio, "": v2}
    monkeypatch.setattr(host_cgroup.cgroup, "memberships",
                        lambda pid="self": {"blkio": "/", "": "/"})
    monkeypatch.setattr(host_cgroup.cgroup, "roots", lambda _: hierarchies)
    host = host_cgroup.HostCgroup.create("/hyperctl/t/c", Limits(io_weight=300),
                                         {"blkio": "/", "": "/"})
    assert (blkio / "hyperctl/t/c/blkio.bfq.weight").read_text() == "300"
    assert (v2 / "hyperctl/t/c/io.weight").read_text() == "100\n"   # v1's blkio serves it
    assert host.created == []


def test_a_resized_vm_moves_the_memory_limit(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "memory", tmp_path / "unified"
    for directory, name in ((v1, "memory.limit_in_bytes"), (v2, "memory.max")):
        directory.mkdir()
        (directory / name).write_text("0")
    (v2 / "pids.max").write_text("max")
    host = host_cgroup.HostCgroup({"memory": v1, "": v2, "pids": tmp_path})
    host.set_vm_memory(768, tcg=True)
    expected = str((768 + host_cgroup.HOST_OVERHEAD_MIB + host_cgroup.TCG_CODE_CACHE_MIB) << 20)
    assert (v1 / "memory.limit_in_bytes").read_text() == expected
    # The v2 files serve only controllers no v1 hierarchy has.
    assert (v2 / "memory.max").read_text() == "0"
    assert (v2 / "pids.max").read_text() == "max"
