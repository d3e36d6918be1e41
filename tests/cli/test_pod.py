"""A pod through the runv CLI: the CRI annotations put a second container into the VM of the
pod's sandbox container, where both share the guest's network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import processes_mentioning

from .conftest import LATE_CHECK, LATE_SEEN, Runv, late_binds

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SERVE = ("mkdir -p /tmp/www && echo pod-hello > /tmp/www/index.html && "
         "exec httpd -f -p 127.0.0.1:8080 -h /tmp/www")


def annotated(kind: str, sandbox: str, shared_fs: str = "virtio-fs") -> Any:
    def edit(spec: dict[str, Any]) -> None:
        spec["annotations"] = {CONTAINER_TYPE: kind, SANDBOX_ID: sandbox,
                               "org.runv.shared-fs": shared_fs}
    return edit


def _qemus(runv: Runv) -> list[str]:
    return [line for line in processes_mentioning(str(runv.state)) if "qemu-system" in line]


@pytest.mark.parametrize("shared_fs", ["virtio-fs", "9p"])
def test_pod_containers_share_one_vm_and_localhost(runv: Runv, tmp_path: Path,
                                                    shared_fs: str) -> None:
    """The second container's rootfs reaches the running guest through the pod's share."""
    sandbox = runv.bundle(["sh", "-c", SERVE], annotated("sandbox", "pod1", shared_fs))
    runv("create", "--bundle", str(sandbox), "pod1")
    runv("start", "pod1")
    pause = runv.state_of("pod1")["pid"]

    def member(spec: dict[str, Any]) -> None:
        annotated("container", "pod1", shared_fs)(spec)
        # As the CRI asks for the pod's IPC and UTS namespaces: by the host path of the
        # sandbox's pid (its stand-in, in namespaces of its own).
        spec["linux"]["namespaces"] = [
            {"type": t, "path": f"/proc/{pause}/ns/{t}"} if t in ("ipc", "uts") else
            {"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
        spec["hostname"] = ""

    out = tmp_path / "c1.out"
    # Its bind sources are on a mount younger than the pod's supervisor.
    with late_binds(tmp_path) as late:
        client = runv.bundle(["sh", "-c", "for i in $(seq 50); do "
                              "wget -qO- http://127.0.0.1:8080/ && break; sleep 0.2; done; "
                              f"readlink /proc/self/ns/ipc; hostname; {LATE_CHECK}"],
                             lambda spec: (member(spec), late(spec)))
        with open(out, "wb") as sink:  # the stand-in of c1's process writes its output here
            runv("create", "--bundle", str(client), "c1", stdout=sink)
        assert len(_qemus(runv)) == 1, _qemus(runv)
        assert runv.state_of("c1")["status"] == "created"
        runv("start", "c1")
        runv.wait_status("c1", "stopped")
        assert (tmp_path / "late" / "dir" / "out.txt").read_text() == "out\n"
    sandbox_ipc = runv("exec", "pod1", "readlink", "/proc/self/ns/ipc").stdout
    assert out.read_bytes() == b"pod-hello\n" + sandbox_ipc + b"runvbox\n" + LATE_SEEN
    assert runv.state_of("pod1")["status"] == "running"

    # The pod's container leaves the VM; the sandbox keeps it.
    runv("delete", "c1")
    assert runv.state_of("pod1")["status"] == "running"
    assert len(_qemus(runv)) == 1

    # A pod's container that cannot be created leaves nothing and the pod keeps working.
    def missing_bind(spec: dict[str, Any]) -> None:
        annotated("container", "pod1", shared_fs)(spec)
        spec["mounts"].append({"destination": "/data", "type": "bind",
                               "source": str(tmp_path / "nope"), "options": ["rbind"]})

    bad = runv.bundle(["true"], missing_bind)
    result = runv("create", "--bundle", str(bad), "c3", check=False)
    assert result.returncode != 0
    assert b"mounts[5].source" in result.stderr, result.stderr
    assert not (runv.root / "c3").exists()
    # Neither c1's nor c3's storage is left in the sandbox's share (the supervisor's mounts).
    supervisor = runv.supervisor_pid("pod1")
    mounts = Path(f"/proc/{supervisor}/mountinfo").read_text()
    share = runv.state / "shares" / runv.sandbox_dir("pod1").name
    assert f"{share}/rootfs-" not in mounts and f"{share}/rootfs " in mounts, mounts
    result = runv("exec", "pod1", "sh", "-c", "wget -qO- http://127.0.0.1:8080/")
    assert result.stdout == b"pod-hello\n"
    runv("kill", "pod1", "KILL")
    runv("delete", "pod1")  # right after: kill answers once the container has stopped
    assert not _qemus(runv)


def test_pod_container_needs_its_sandbox(runv: Runv) -> None:
    bundle = runv.bundle(["true"], annotated("container", "nopod"))
    result = runv("create", "--bundle", str(bundle), "c2", check=False)
    assert result.returncode != 0
    assert b"pod sandbox nopod" in result.stderr, result.stderr
    assert not (runv.root / "c2").exists()
