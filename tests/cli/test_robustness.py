"""kill -9 of each host process of a sandbox at a bad moment: `state` tells the truth,
`delete` cleans everything up; and many runv processes working at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runv_py import child
from runv_py.sandbox import vm_dir
from runv_py.sandbox.runtime import KILL_ANSWER_S
from tests.vm.conftest import processes_mentioning

from .conftest import Runv, reap


def _pid_of(program: str, vm_dir: str) -> int:
    for line in processes_mentioning(vm_dir):
        pid, _, cmdline = line.partition(": ")
        if Path(cmdline.split(" ", 1)[0]).name.startswith(program):
            return int(pid)
    raise AssertionError(f"no {program} for {vm_dir}")


def _running(runv: Runv, tmp_path: Path, cid: str, annotations: dict[str, str] | None = None
             ) -> int:
    def edit(spec: dict[str, object]) -> None:
        spec["annotations"] = annotations or {}

    bundle = runv.bundle(["sleep", "600"], edit=edit)
    runv("run", "-d", "--bundle", str(bundle), "--pid-file", str(tmp_path / f"{cid}.pid"), cid)
    return int((tmp_path / f"{cid}.pid").read_text())


def test_supervisor_killed(runv: Runv, tmp_path: Path) -> None:
    standin = _running(runv, tmp_path, "c1")
    os.kill(runv.supervisor_pid("c1"), signal.SIGKILL)
    runv.wait_status("c1", "stopped")
    assert reap(standin) == 255  # the stand-in notices and exits
    runv("delete", "c1")
    assert runv.leftovers() == []


def test_qemu_killed(runv: Runv, tmp_path: Path) -> None:
    standin = _running(runv, tmp_path, "c1")
    os.kill(_pid_of("qemu-system", str(runv.sandbox_dir("c1"))), signal.SIGKILL)
    runv.wait_status("c1", "stopped")
    assert reap(standin) == 137
    runv("delete", "c1")
    assert runv.leftovers() == []


def test_sigkill_ends_a_container_whose_qemu_is_stopped(runv: Runv, tmp_path: Path) -> None:
    """A guest that cannot take a SIGKILL (its QEMU stopped, here with its container paused
    and a resume waiting on QEMU) is ended instead: `kill` succeeds and the container exits
    137, so that containerd's `task delete -f` works (the soak met a task it could not
    delete); the stuck resume ends with one line."""
    standin = _running(runv, tmp_path, "c1")
    runv("pause", "c1")
    qemu = _pid_of("qemu-system", str(runv.sandbox_dir("c1")))
    os.kill(qemu, signal.SIGSTOP)
    resume = runv.popen("resume", "c1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1)
    runv("kill", "c1", "KILL", timeout=90)
    assert reap(standin) == 137
    assert runv.state_of("c1")["status"] == "stopped"
    _, err = resume.communicate(timeout=60)
    assert resume.returncode == 1 and len(err.decode().strip().splitlines()) == 1, err
    runv("delete", "c1")
    assert runv.leftovers() == []


def test_sigkill_ends_a_container_whose_supervisor_is_stopped(runv: Runv, tmp_path: Path
                                                              ) -> None:
    """A supervisor stopped for good cannot take a SIGKILL: `kill` ends the sandbox with it
    (after KILL_ANSWER_S) and the container's process exits 137, as it would have; `delete`
    then cleans up. Other signals wait for an answer (they may be handled)."""
    standin = _running(runv, tmp_path, "c1")
    supervisor = runv.supervisor_pid("c1")
    os.kill(supervisor, signal.SIGSTOP)
    term = runv.popen("kill", "c1", "TERM", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(KILL_ANSWER_S + 2)
    assert term.poll() is None  # still waiting for the supervisor
    runv("kill", "c1", "KILL", timeout=60)
    assert reap(standin) == 137
    _, err = term.communicate(timeout=30)
    assert term.returncode == 1 and len(err.decode().strip().splitlines()) == 1, err
    assert runv.state_of("c1")["status"] == "stopped"
    runv("delete", "c1")
    assert runv.leftovers() == []


def test_virtiofsd_killed(runv: Runv, tmp_path: Path) -> None:
    # virtio-fs asked for by annotation: a cold boot (a template's clones use 9p).
    standin = _running(runv, tmp_path, "c1", {"org.runv.shared-fs": "virtio-fs"})
    os.kill(_pid_of("virtiofsd", str(runv.sandbox_dir("c1"))), signal.SIGKILL)
    assert runv.state_of("c1")["status"] in ("running", "stopped")
    runv("delete", "--force", "c1")
    assert reap(standin) == 137
    assert runv.leftovers() == []


def test_standin_killed(runv: Runv, tmp_path: Path) -> None:
    standin = _running(runv, tmp_path, "c1")
    os.kill(standin, signal.SIGKILL)
    assert reap(standin) == 137
    runv.wait_status("c1", "stopped")  # the container's process went with its stand-in
    runv("delete", "c1")
    assert runv.leftovers() == []


def test_stopped_standin_gets_its_exit(runv: Runv, tmp_path: Path) -> None:
    """A stand-in stopped (SIGSTOP, a terminal's ^Z) when its process is killed still exits
    with the process's status: its waiter (containerd's shim, conmon) would wait forever."""
    standin = _running(runv, tmp_path, "c1")
    os.kill(standin, signal.SIGSTOP)
    runv("delete", "--force", "c1")
    assert reap(standin, timeout_s=30) == 137
    assert runv.leftovers() == []


def _create_booting(runv: Runv, cid: str) -> subprocess.Popen[bytes]:
    """`runv create` of a cold boot (its guest takes seconds under TCG), returned once its
    VM has started: the create is still running and holds the container's lock."""
    bundle = runv.bundle(["true"], lambda spec: spec.update(
        annotations={"org.runv.template": "off"}))
    create = runv.popen("create", "--bundle", str(bundle), cid,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (runv.sandbox_dir(cid) / "console.log").exists():
        time.sleep(0.01)
    return create


def test_stopped_create_is_named_not_waited_for(runv: Runv, tmp_path: Path) -> None:
    """`runv create` holds the container's lock while the VM boots; stopped there, it makes
    a later command fail with its name instead of hanging it."""
    create = _create_booting(runv, "c1")
    os.kill(create.pid, signal.SIGSTOP)
    result = runv("delete", "--force", "c1", check=False, timeout=60)
    assert result.returncode == 1
    error = result.stderr.decode()
    assert f"locked by process {create.pid} (" in error and "which is stopped" in error, error
    create.kill()  # as containerd does with a create whose context ended
    create.wait()
    runv("delete", "--force", "c1", check=False)
    assert runv.leftovers() == []


def test_delete_force_while_running_and_during_create(runv: Runv, tmp_path: Path) -> None:
    standin = _running(runv, tmp_path, "c1")
    runv("delete", "--force", "c1")
    assert reap(standin) == 137
    create = _create_booting(runv, "c2")
    create.kill()  # containerd kills runv create when its context is cancelled
    create.wait()
    # Like runc: a container whose create did not finish does not exist; its delete still
    # stops the sandbox that create started.
    assert b"does not exist" in runv("state", "c2", check=False).stderr
    out = runv("delete", "--force", "c2", check=False).stderr
    assert b"does not exist" in out
    assert runv.leftovers() == []


def test_delete_force_ends_a_sandbox_whose_record_is_gone(runv: Runv, tmp_path: Path) -> None:
    """A create's cleanup cut short can leave a running sandbox at an id runv has no record
    of (the soak met one): `delete --force` of the id still ends it, and says, as for any
    container without a record, that it does not exist."""
    standin = _running(runv, tmp_path, "c1")
    supervisor = vm_dir.owner(runv.sandbox_dir("c1"))
    assert supervisor is not None
    shutil.rmtree(runv.root / "c1")
    result = runv("delete", "--force", "c1", check=False)
    assert result.returncode == 1 and b"container c1 does not exist" in result.stderr
    assert reap(standin) == 137
    assert not child.is_running(*supervisor)
    assert runv.leftovers() == []


def test_a_stopped_supervisor_dies_with_the_create_that_started_it(runv: Runv) -> None:
    """Until it has reported, a supervisor belongs to the create that started it. Stopped
    while it boots and its create killed, nothing of its own can end it (hyperctl's monitor
    removed by rm -f met this in the soak): the kernel's parent-death signal does."""
    create = _create_booting(runv, "c1")
    found = None
    while found is None:
        found = vm_dir.owner(runv.sandbox_dir("c1"))
        time.sleep(0.01)
    supervisor, start = found
    os.kill(supervisor, signal.SIGSTOP)
    create.kill()
    create.wait()
    deadline = time.monotonic() + 10
    while child.is_running(supervisor, start) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not child.is_running(supervisor, start), child.describe(supervisor)
    runv("delete", "--force", "c1", check=False)  # as containerd does after a failed create
    assert runv.leftovers() == []


def test_ten_containers_at_once(runv: Runv, tmp_path: Path) -> None:
    ids = [f"p{i}" for i in range(10)]
    bundles = {cid: runv.bundle(["sh", "-c", f"echo {cid}"]) for cid in ids}

    def lifecycle(cid: str) -> bytes:
        result = runv("run", "--bundle", str(bundles[cid]), cid, timeout=600)
        return result.stdout

    with ThreadPoolExecutor(len(ids)) as pool:
        outputs = list(pool.map(lifecycle, ids))
    assert outputs == [f"{cid}\n".encode() for cid in ids]
    assert runv.leftovers() == []
