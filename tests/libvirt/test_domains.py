"""What the libvirt backend adds: the sandbox is a domain libvirt shows and manages (its state,
cgroup and security driver), a killed supervisor leaves no domain behind, the reconciler
destroys domains whose owner is gone, and what cannot work with libvirt is refused in one
line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runv_py.child import with_descendants
from runv_py.vm.libvirt.domain import DomainOwner, domain_xml
from runv_py.vm.qemu.cmdline import VmConfig
from tests.cli.conftest import Runv, reap
from tests.cli.test_robustness import (  # noqa: F401 (collected here again)
    _pid_of,
    _running,
    test_qemu_killed,
)
from tests.hyperctl.conftest import Hyperctl
from tests.libvirtd import PrivateLibvirtd
from tests.security.test_guest_log_bounds import (  # noqa: F401 (collected here again)
    test_a_console_flood_keeps_the_newest_output_in_bounded_files,
)

pytestmark = pytest.mark.vm


def _domain(runv: Runv, cid: str) -> str:
    return "runv-" + runv.sandbox_dir(cid).name


def _wait_gone(libvirtd: PrivateLibvirtd, name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while name in libvirtd.domains():
        assert time.monotonic() < deadline, f"domain {name} is still there"
        time.sleep(0.2)


def test_the_sandbox_is_a_domain_libvirt_runs(runv: Runv, libvirtd: PrivateLibvirtd,
                                             tmp_path: Path) -> None:
    standin = _running(runv, tmp_path, "c1")
    name = _domain(runv, "c1")
    assert libvirtd.domains() == {name: "running"}
    # libvirt placed QEMU in its own cgroup and runs it under its DAC security driver.
    qemu = _pid_of("qemu-system", str(runv.sandbox_dir("c1")))
    cgroups = Path(f"/proc/{qemu}/cgroup").read_text()
    assert re.search(rf"^\d+:memory:/machine/qemu-\d+-{name}\.libvirt-qemu$", cgroups,
                     re.M), cgroups
    assert "Persistent:     no" in libvirtd.virsh("dominfo", name).stdout  # transient
    live = libvirtd.virsh("dumpxml", name).stdout
    assert re.search(r"<seclabel type='static' model='dac' relabel='no'>\s*<label>\+0:\+0<",
                     live), live
    assert qemu not in with_descendants(runv.supervisor_pid("c1"))  # libvirtd started it
    runv("pause", "c1")
    assert libvirtd.domains() == {name: "paused"}
    runv("resume", "c1")
    assert libvirtd.domains() == {name: "running"}
    assert runv("exec", "c1", "echo", "in").stdout == b"in\n"
    runv("kill", "c1", "KILL")
    assert reap(standin) == 137
    runv("delete", "c1")
    assert libvirtd.domains() == {}
    assert runv.leftovers() == []


def test_a_9p_share_reaches_the_supervisors_mounts(runv: Runv, tmp_path: Path) -> None:
    """libvirt's QEMU serves the supervisor's private shared directory over 9p, through
    /proc/<supervisor>/root: reads, writes, and files of another owner (caps kept)."""
    def edit(spec: dict[str, object]) -> None:
        spec["annotations"] = {"org.runv.shared-fs": "9p"}

    bundle = runv.bundle(["sh", "-c", "cat /etc/passwd; echo out > /tmp/w; chown 1000:1000 /tmp/w;"
                          " stat -c %u:%g /tmp/w; grep -c ' 9p ' /proc/mounts"], edit)
    out = runv("run", "--bundle", str(bundle), "c1").stdout.decode().splitlines()
    assert out[0] == "root:x:0:0:root:/:/bin/sh" and out[-1] != "0", out
    assert out[-2] == "1000:1000", out
    written = bundle / "rootfs" / "tmp" / "w"
    assert written.read_text() == "out\n" and written.stat().st_uid == 1000


def test_a_killed_supervisor_leaves_no_domain(runv: Runv, libvirtd: PrivateLibvirtd,
                                              tmp_path: Path) -> None:
    standin = _running(runv, tmp_path, "c1")
    name = _domain(runv, "c1")
    assert name in libvirtd.domains()
    os.kill(runv.supervisor_pid("c1"), signal.SIGKILL)
    _wait_gone(libvirtd, name)  # its connection closed: libvirtd destroyed the domain
    assert reap(standin) == 255
    runv("delete", "c1")
    assert runv.leftovers() == []


def test_the_reconciler_destroys_domains_whose_owner_is_gone(
        runv: Runv, libvirtd: PrivateLibvirtd, assets_dir: Path, tmp_path: Path) -> None:
    # A runv domain libvirtd did not autodestroy (as after a libvirtd restart): started by
    # virsh on a connection that closes at once, its owner a process that has exited.
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = VmConfig(name="orphan", qemu="qemu-system-x86_64", machine="pc", accel="tcg",
                      vcpus=1, memory_mib=64, kernel=assets_dir / "kernel" / "vmlinux",
                      kernel_cmdline="console=ttyS0", console_log=tmp_path / "console.log",
                      qmp_socket=tmp_path / "qmp.sock")
    (tmp_path / "orphan.xml").write_text(domain_xml(orphan, DomainOwner(gone.pid, 1)))
    libvirtd.virsh("create", str(tmp_path / "orphan.xml"), "--paused")
    assert libvirtd.domains() == {"runv-orphan": "paused"}
    bundle = runv.bundle(["echo", "ran"])
    assert runv("run", "--bundle", str(bundle), "c1").stdout == b"ran\n"
    assert "runv-orphan" not in libvirtd.domains()


def test_hyperctl_sandboxes_are_domains(hyperctl: Hyperctl, libvirtd: PrivateLibvirtd) -> None:
    hyperctl("run", "-d", "--name", "job", "busybox", "sleep", "600")
    domains = libvirtd.domains()
    assert len(domains) == 1 and next(iter(domains.values())) == "running", domains
    assert next(iter(domains)).startswith("runv-")
    assert hyperctl("exec", "job", "echo", "in").stdout == b"in\n"
    hyperctl("rm", "-f", "job")
    assert libvirtd.domains() == {}


def test_what_libvirt_cannot_do_is_refused_in_one_line(runv: Runv, hypervisor_toml: str,
                                                       tmp_path: Path) -> None:
    def one_line_error(result: subprocess.CompletedProcess[bytes], *words: str) -> None:
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert all(word in lines[0] for word in words), lines[0]

    def run_with(config: str, cid: str) -> subprocess.CompletedProcess[bytes]:
        (tmp_path / f"{cid}.toml").write_text(config)
        env = runv.env
        runv.env = dict(env, RUNV_CONFIG=str(tmp_path / f"{cid}.toml"))
        try:
            return runv("run", "--bundle", str(bundle), cid, check=False)
        finally:
            runv.env = env

    bundle = runv.bundle(["true"])
    one_line_error(run_with(f'state_dir = "{runv.state}"\ntemplate = "auto"\n'
                            f"[hypervisor]\n{hypervisor_toml}", "t1"),
                   'template = "auto"', "libvirt", "migration stream")
    one_line_error(run_with(f'state_dir = "{runv.state}"\n[hypervisor]\nmachine = "microvm"\n'
                            + hypervisor_toml, "t2"), "microvm", "PCI")
    annotated = runv.bundle(["true"], lambda spec: spec.update(
        annotations={"org.runv.template": "auto"}))
    one_line_error(runv("run", "--bundle", str(annotated), "t3", check=False),
                   "templates", "backend", "qemu")
    one_line_error(runv("template", "create", check=False), "templates", "qemu")
    one_line_error(runv("pool", "serve", check=False), "warm pool", "qemu")
    assert runv.leftovers() == []


def test_features_name_the_backend(runv: Runv) -> None:
    features = json.loads(runv("features").stdout)
    assert features["annotations"]["org.runv.hypervisor"] == "libvirt"
