"""The reconciler's ownership logic, on real processes and directories (no VM): what a live or
starting owner holds is never found; what a dead one held is, and its remover removes it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import child
from runv_py.config import NetworkConfig
from runv_py.errors import ConfigError
from runv_py.reconcile import model, mounts, processes, reconciler, records, sandbox_dirs
from runv_py.reconcile import shim_sockets as reconcile_shim_sockets
from runv_py.reconcile.model import Owners, Scope
from runv_py.sandbox import vm_dir
from runv_py.store import shim_sockets
from runv_py.workload import network_mode
from runv_py.workload.records import Records, Workload


@pytest.fixture
def scope(tmp_path: Path) -> Scope:
    return Scope(state_dir=tmp_path / "state", hyperctl_root=tmp_path / "hc-root",
                 data_root=tmp_path / "data", netns_dir=tmp_path / "netns",
                 network=NetworkConfig(cni_data_dir=tmp_path / "cni"))


def dead_process() -> tuple[int, int]:
    """The pid and start time of a process that ran and is gone."""
    proc = subprocess.Popen(["sleep", "60"])
    start = child.proc_start_time(proc.pid)
    assert start is not None
    proc.kill()
    proc.wait()
    return proc.pid, start


def owned_by(path: Path, owner: tuple[int, int]) -> Path:
    path.mkdir(parents=True)
    (path / vm_dir.OWNER).write_text(f"{owner[0]} {owner[1]}\n")
    return path


def me() -> tuple[int, int]:
    start = child.proc_start_time(os.getpid())
    assert start is not None
    return os.getpid(), start


def test_a_claimed_vm_dir_appears_with_its_owner_and_only_once(scope: Scope) -> None:
    path = scope.sandboxes / "a"
    vm_dir.claim(path)
    assert vm_dir.owner(path) == me()
    with pytest.raises(ConfigError, match="already exists"):
        vm_dir.claim(path)
    assert [p.name for p in scope.sandboxes.iterdir()] == ["a"]  # no claim dir left


def test_vm_dirs_of_live_and_starting_owners_are_kept(scope: Scope) -> None:
    owners = Owners(scope)
    live = owned_by(scope.sandboxes / "live", me())
    starting = owned_by(scope.sandboxes / f"{vm_dir.CLAIM_PREFIX}{os.getpid()}-{me()[1]}-ab",
                        me())
    dead = owned_by(scope.sandboxes / "dead", dead_process())
    dead_claim = scope.sandboxes / f"{vm_dir.CLAIM_PREFIX}{dead_process()[0]}-1-cd"
    dead_claim.mkdir()
    link = scope.sandboxes / "link"
    link.symlink_to(scope.sandboxes / "gone")
    (scope.shares / "dead").mkdir(parents=True)
    (scope.shares / "live").mkdir(parents=True)
    assert not owners.vm_dir_dead(live) and not owners.vm_dir_dead(starting)
    found = asyncio.run(sandbox_dirs.find(scope, owners))
    assert sorted(Path(f.name).name for f in found) == sorted([dead.name, dead_claim.name, "link"])
    shares = asyncio.run(sandbox_dirs.find_shares(scope, owners))
    assert [Path(s.name).name for s in shares] == ["dead"]
    for item in (*found, *shares):
        asyncio.run(item.remove())
    assert sorted(p.name for p in scope.sandboxes.iterdir()) == sorted([live.name,
                                                                        starting.name])
    assert [p.name for p in scope.shares.iterdir()] == ["live"]


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[Path]:
    """A program named like QEMU (a shell waiting on its stdin)."""
    program = tmp_path / "qemu-system-x86_64"
    program.symlink_to("/bin/sh")
    yield program


def test_processes_of_a_dead_sandbox_are_found_and_killed(scope: Scope,
                                                          fake_qemu: Path) -> None:
    dead = owned_by(scope.sandboxes / "dead", dead_process())
    live = owned_by(scope.sandboxes / "live", me())
    procs = {name: subprocess.Popen([str(fake_qemu), "-c", "read x", "sh",
                                     f"path={path}/qmp.sock,server=on"],
                                    stdin=subprocess.PIPE)
             for name, path in (("dead", dead), ("live", live))}
    try:
        found = asyncio.run(processes.find(scope, Owners(scope)))
        assert [(f.pid, f.owner) for f in found] == [(procs["dead"].pid, "sandbox dead")]
        asyncio.run(found[0].remove())
        assert procs["dead"].wait(10) == -9
        assert procs["live"].poll() is None
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_program_names_only_a_sandbox_s_processes() -> None:
    assert processes.program(["/usr/bin/qemu-system-x86_64", "-name", "x"])
    assert processes.program(["/usr/libexec/virtiofsd", "--socket-path=/x"])
    assert processes.program(["/usr/bin/python3", "-m", "runv_py.vsock", "--cid=3"])
    assert processes.program(["/usr/bin/python3", "-m", "runv_py.sandbox.standin"])
    assert processes.program(["/usr/bin/python3", "-m", "runv_py.sandbox.supervisor"]) is None
    assert processes.program(["/usr/bin/tail", "-f", "/run/runv/sandboxes/x/console.log"]) \
        is None


def workload(workload_id: str, **fields: object) -> Workload:
    return Workload(id=workload_id, bundle="/b", rootfs="/r", created="now", name="w" +
                    workload_id[:6], image="busybox", command=("true",), created_at=0.0,
                    **fields)  # type: ignore[arg-type]


def test_a_network_sandbox_is_dead_only_when_its_owner_file_s_workload_is(
        scope: Scope) -> None:
    owners = Owners(scope)
    store = Records(scope.data_root)
    wid = "ab" * 16
    sandbox = network_mode.sandbox_id(wid)
    store.create(workload(wid))
    vm_path = scope.state_dir / "elsewhere" / "vm"   # another state_dir than the scope's
    owner_file = network_mode.owner_file(scope.network, sandbox)
    network_mode.NetworkOwner(store.dir(wid), vm_path).write(owner_file)
    assert not owners.hyperctl_sandbox_dead(sandbox)     # not started: being made
    store.save(workload(wid, started=1.0))
    owned_by(vm_path, me())
    assert not owners.hyperctl_sandbox_dead(sandbox)     # its supervisor lives
    dead_pid, dead_start = dead_process()
    (vm_path / vm_dir.OWNER).write_text(f"{dead_pid} {dead_start}\n")
    monitor = subprocess.Popen(["sleep", "60"])
    try:
        store.save(workload(wid, started=1.0, monitor_pid=monitor.pid,
                            monitor_start=child.proc_start_time(monitor.pid) or 0))
        assert not owners.hyperctl_sandbox_dead(sandbox)  # its monitor lives
    finally:
        monitor.kill()
        monitor.wait()
    assert owners.hyperctl_sandbox_dead(sandbox)
    store.remove(store.load(wid))
    assert owners.hyperctl_sandbox_dead(sandbox)          # its record is gone
    owner_file.unlink()
    # Without an owner file, a sandbox no record of this data root knows is not ours.
    assert not owners.hyperctl_sandbox_dead(sandbox)


def test_records_half_made_or_half_removed_are_found_unless_their_maker_lives(
        scope: Scope) -> None:
    store = Records(scope.data_root)
    store.create(workload("cd" * 16))
    pid, start = me()
    making = store.root / f".new-{'ef' * 16}-{pid}-{start}"
    making.mkdir()
    dead_pid, dead_start = dead_process()
    abandoned = store.root / f".new-{'01' * 16}-{dead_pid}-{dead_start}"
    abandoned.mkdir()
    (store.root / ".gone-23").mkdir()
    (store.names / "being-made").symlink_to("ef" * 16)
    (store.names / "dangling").symlink_to("45" * 16)
    assert store.ids() == ["cd" * 16]
    found = asyncio.run(records.find(scope, Owners(scope)))
    assert sorted(Path(f.name).name for f in found) == sorted(
        [abandoned.name, ".gone-23", "dangling"])
    for item in found:
        asyncio.run(item.remove())
    assert sorted(p.name for p in store.root.iterdir()) == sorted(["cd" * 16, making.name])
    assert sorted(p.name for p in store.names.iterdir()) == sorted(["being-made", "wcdcdcd"])


def test_sockets_of_dead_shims_are_found_those_listening_or_being_bound_kept(
        scope: Scope) -> None:
    directory = shim_sockets.directory(scope.state_dir)
    directory.mkdir(parents=True)
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(directory / "live"))
    live.listen(1)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(directory / "dead"))  # its shim was SIGKILLed: the file stays
    dead.listen(1)
    dead.close()
    binding_dead = directory / shim_sockets.binding_name("x", *dead_process())
    binding_live = directory / shim_sockets.binding_name("y", *me())  # a `start` binding now
    for path in (binding_dead, binding_live):
        path.touch()
    try:
        found = asyncio.run(reconcile_shim_sockets.find(scope, Owners(scope)))
        assert sorted(o.name for o in found) == sorted([str(directory / "dead"),
                                                        str(binding_dead)])
        for orphan in found:
            asyncio.run(orphan.remove())
        assert sorted(p.name for p in directory.iterdir()) == sorted(["live", binding_live.name])
    finally:
        live.close()


def test_a_dry_run_removes_nothing(scope: Scope) -> None:
    dead = owned_by(scope.sandboxes / "dead", dead_process())
    outcomes = asyncio.run(reconciler.run(replace(scope), dry_run=True))
    assert [(o.orphan.kind, o.removed) for o in outcomes] == [("sandbox-dir", False)]
    assert dead.exists()
    outcomes = asyncio.run(reconciler.run(scope))
    assert [(o.orphan.kind, o.removed) for o in outcomes] == [("sandbox-dir", True)]
    assert not dead.exists()


def test_the_pool_service_s_pass_runs_at_start(scope: Scope) -> None:
    dead = owned_by(scope.sandboxes / "dead", dead_process())

    async def serve_briefly() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(reconciler.run_periodically(scope, 300, stop))
        for _ in range(100):
            if not dead.exists():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(serve_briefly())
    assert not dead.exists()


def test_interrupted_asset_builds_are_removed_with_what_is_mounted_in_them(
        tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "interrupted-builds.sh"
    work = tmp_path / "rootfs-0123.work.AbCd"
    (work / "root" / "proc").mkdir(parents=True)
    (tmp_path / "rootfs-0123.new").mkdir()
    kept = tmp_path / "rootfs-4567"
    kept.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "gc-test", str(work / "root" / "proc")],
                   check=True)
    try:
        done = subprocess.run(
            ["bash", "-c", f'. {script}; remove_interrupted "$1"/rootfs-*.work.* '
             f'"$1"/rootfs-*.new "$1"/kernel-*.work.*', "sh", str(tmp_path)],
            capture_output=True, text=True, timeout=30, check=False)
    finally:
        subprocess.run(["umount", "-l", str(work / "root" / "proc")], check=False,
                       capture_output=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs-4567"]
    assert done.stderr.count("left by an interrupted build") == 2


@pytest.fixture
def fake_monitor(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """A process whose command line is a monitor's (`python -m runv_py.workload.monitor --id
    ID`), that only waits."""
    package = tmp_path / "fake" / "runv_py" / "workload"
    package.mkdir(parents=True)
    for init in (package.parent / "__init__.py", package / "__init__.py"):
        init.write_text("")
    (package / "monitor.py").write_text("import sys\nsys.stdin.read()\n")
    started: list[subprocess.Popen[bytes]] = []

    def start(workload_id: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "runv_py.workload.monitor", "--id",
                                 workload_id], stdin=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=str(tmp_path / "fake")))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_workload_that_never_started_is_its_creator_s_or_its_monitor_s(
        scope: Scope, fake_monitor: Callable[[str], subprocess.Popen[bytes]]) -> None:
    store = Records(scope.data_root)
    pid, start = me()
    dead_pid, dead_start = dead_process()
    starting = workload("01" * 16, creator_pid=pid, creator_start=start)
    handed_over = workload("23" * 16, creator_pid=dead_pid, creator_start=dead_start)
    abandoned = workload("45" * 16, creator_pid=dead_pid, creator_start=dead_start)
    older = workload("67" * 16)   # from before records named their creator
    for item in (starting, handed_over, abandoned, older):
        store.create(item)
    monitor = fake_monitor(handed_over.id)
    deadline = time.monotonic() + 30
    while not model.monitor_running(handed_over.id):
        assert time.monotonic() < deadline and monitor.poll() is None
        time.sleep(0.05)
    found = asyncio.run(records.find(scope, Owners(scope)))
    assert [Path(f.name).name for f in found] == [abandoned.id]
    asyncio.run(found[0].remove())
    assert store.ids() == sorted([starting.id, handed_over.id, older.id])
    assert abandoned.name not in os.listdir(store.names)


def test_mounts_under_a_dead_sandbox_are_unmounted(scope: Scope) -> None:
    owned_by(scope.sandboxes / "dead", dead_process())
    owned_by(scope.sandboxes / "live", me())
    points = [scope.shares / "dead" / "rootfs", scope.shares / "live" / "rootfs"]
    for point in points:
        point.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "gc-test", str(point)], check=True)
    try:
        found = asyncio.run(mounts.find(scope, Owners(scope)))
        assert [f.name for f in found] == [str(points[0])]
        asyncio.run(found[0].remove())
        assert mounts.mount_points().count(str(points[0])) == 0
        assert str(points[1]) in mounts.mount_points()
    finally:
        for point in points:
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def test_prune_images_lists_unused_image_data_and_removes_it_with_force(
        tmp_path: Path) -> None:
    partial = tmp_path / "data" / "images" / "tmp" / f"{'89' * 32}.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 300_000)
    (tmp_path / "config.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n'
                                          f'[network]\ncni_data_dir = "{tmp_path / "cni"}"\n')
    env = dict(os.environ, RUNV_CONFIG=str(tmp_path / "config.toml"),
               HYPERCTL_ROOT=str(tmp_path / "root"), HYPERCTL_DATA_ROOT=str(tmp_path / "data"))
    hyperctl = str(Path(sys.executable).parent / "hyperctl")

    def prune(*flags: str) -> str:
        done = subprocess.run([hyperctl, "system", "prune", *flags], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "image-data" not in prune()
    listed = prune("--images")
    assert "image-data" in listed and "300.0 kB" in listed, listed
    assert partial.exists()
    removed = prune("--images", "-f")
    assert "removed 1 of 1" in removed, removed
    assert not partial.exists()


def test_a_workload_whose_creator_runs_is_never_dead(scope: Scope) -> None:
    """An attached `hyperctl run` (or a program using the API) holds its workload while it
    runs, also between its VM's end and the release of its network."""
    pid, start = me()
    ran = workload("89" * 16, started=1.0, exit_code=0, creator_pid=pid, creator_start=start)
    assert not Owners(scope).workload_dead(ran)
    dead_pid, dead_start = dead_process()
    assert Owners(scope).workload_dead(replace(ran, creator_pid=dead_pid,
                                               creator_start=dead_start))
