"""`runv update` resizes the running sandbox's VM (docs/resize.md): memory DIMMs and vCPUs
hot-plugged as the container's limits grow, DIMMs unplugged (their memory back to the host) as
they shrink, a request beyond [hypervisor] max_memory_mib / max_vcpus refused with nothing
changed. In a real guest from the default config's template path."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from runv_py.sandbox import cgroup
from tests.cli.conftest import Runv
from tests.cli.test_pod import annotated
from tests.vm.conftest import processes_mentioning

MIB = 1 << 20


def _mem_total_mib(runv: Runv, cid: str) -> int:
    meminfo = runv("exec", cid, "cat", "/proc/meminfo").stdout.decode()
    match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    assert match, meminfo
    return int(match.group(1)) // 1024


def _cpus_online(runv: Runv, cid: str) -> str:
    return runv("exec", cid, "cat", "/sys/devices/system/cpu/online").stdout.decode().strip()


def _memory_limit(runv: Runv, cid: str) -> int:
    stats = json.loads(runv("events", "--stats", cid).stdout)
    return int(stats["data"]["memory"]["usage"]["limit"])


def _dimm_mappings_mib(qemu: int) -> list[int]:
    """The sizes of QEMU's mappings of DIMM memory (hotplug.add_dimm: memfd backends; the
    boot RAM of a template clone is its template's file)."""
    sizes = []
    for line in Path(f"/proc/{qemu}/maps").read_text().splitlines():
        if "/memfd:memory-backend-memfd" in line:
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            sizes.append((end - start) // MIB)
    return sizes


def _qemu_pid(runv: Runv, cid: str) -> int:
    """The QEMU of the sandbox: the one process whose argv names its VM directory."""
    [qemu] = [line for line in processes_mentioning(str(runv.sandbox_dir(cid)))
              if "qemu-system" in line]
    return int(qemu.split(":")[0])


CGROUP = f"runvtest{os.getpid()}r"


def _with_tmpfs_and_cgroup(spec: dict[str, Any]) -> None:
    spec["mounts"].append({"destination": "/fill", "type": "tmpfs", "source": "tmpfs",
                           "options": ["size=600m"]})
    spec["linux"]["cgroupsPath"] = f"/{CGROUP}"


def _host_memory_limit_mib() -> int:
    """The memory limit of the sandbox's host cgroup (host_cgroup.py: the VM's memory plus
    the host processes' and, under TCG, QEMU's code cache)."""
    roots = cgroup.roots(cgroup.memberships())
    v1 = next((root for controllers, root in roots.items()
               if "memory" in controllers.split(",")), None)
    path = v1 / CGROUP / "memory.limit_in_bytes" if v1 else roots[""] / CGROUP / "memory.max"
    return int(path.read_text()) >> 20


def test_update_grows_and_shrinks_the_vm(runv: Runv) -> None:
    bundle = runv.bundle(["sleep", "600"], edit=_with_tmpfs_and_cgroup)
    runv("run", "--bundle", str(bundle), "--detach", "c1")
    before_mib, before_cpus = _mem_total_mib(runv, "c1"), _cpus_online(runv, "c1")
    assert before_cpus == "0"
    qemu = _qemu_pid(runv, "c1")
    status = Path(f"/proc/{qemu}/status").read_text()
    # maxmem (8 GiB by default) is address space the DIMMs may take, not memory: QEMU maps
    # only the boot RAM.
    vm_size_kib = int(re.search(r"^VmSize:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    assert vm_size_kib < 8192 * 1024, status
    host_overhead = _host_memory_limit_mib() - 256

    started = time.monotonic()
    runv("update", "--memory", "512m", "--cpu-quota", "200000", "--cpu-period", "100000", "c1")
    grow_s = time.monotonic() - started
    grown_mib = _mem_total_mib(runv, "c1")
    assert 512 <= grown_mib - before_mib <= 512 + 8, (before_mib, grown_mib)
    assert _cpus_online(runv, "c1") == "0-1"
    assert _memory_limit(runv, "c1") == 512 * MIB
    assert _dimm_mappings_mib(qemu) == [512]
    assert _host_memory_limit_mib() == 768 + host_overhead

    # Beyond the maximum: one line naming the field, and nothing changed.
    refused = runv("update", "--memory", "16g", "c1", check=False)
    assert refused.returncode != 0
    error = refused.stderr.decode().strip()
    assert "max_memory_mib" in error and len(error.splitlines()) == 1, error
    refused = runv("update", "--cpu-quota", "900000", "c1", check=False)
    assert refused.returncode != 0 and b"max_vcpus" in refused.stderr, refused.stderr
    assert _mem_total_mib(runv, "c1") == grown_mib
    assert _memory_limit(runv, "c1") == 512 * MIB
    assert _cpus_online(runv, "c1") == "0-1"

    # Shrinking gives memory back: the guest empties and ejects the 512 MiB DIMM (swapped
    # for one of 128 MiB, as 64 MiB more than the boot size is still needed), QEMU drops it.
    started = time.monotonic()
    runv("update", "--memory", "64m", "c1")
    shrink_s = time.monotonic() - started
    assert _mem_total_mib(runv, "c1") == before_mib + 128
    assert _memory_limit(runv, "c1") == 64 * MIB
    assert _dimm_mappings_mib(qemu) == [128]
    assert _host_memory_limit_mib() == 384 + host_overhead
    # No limit: back to the boot size.
    unlimited = json.dumps({"memory": {"limit": -1}}).encode()
    runv("update", "--resources", "-", "c1", input=unlimited)
    assert _mem_total_mib(runv, "c1") == before_mib
    assert _dimm_mappings_mib(qemu) == []
    log = (runv.root / "c1" / "supervisor.log").read_text()
    assert "VM grown to 2 vCPUs and 768 MiB" in log, log
    assert "VM shrunk to 384 MiB (dimm1 for dimm2 of 128 MiB unplugged)" in log, log
    assert "VM shrunk to 256 MiB (dimm2 unplugged)" in log, log

    # A DIMM the guest cannot empty (300 MiB of tmpfs, which the boot memory cannot take)
    # stays; the container keeps running with its new limit.
    runv("update", "--memory", "512m", "c1")
    runv("exec", "c1", "dd", "if=/dev/zero", "of=/fill/x", "bs=1M", "count=300")
    runv("update", "--resources", "-", "c1", input=unlimited)
    assert _mem_total_mib(runv, "c1") == before_mib + 512
    assert _dimm_mappings_mib(qemu) == [512]
    assert _memory_limit(runv, "c1") > 16 << 30  # none
    log = (runv.root / "c1" / "supervisor.log").read_text()
    assert "memory dimm3 (512 MiB) stays in the VM: the guest would have" in log, log
    runv("exec", "c1", "rm", "/fill/x")
    runv("update", "--resources", "-", "c1", input=unlimited)
    assert _mem_total_mib(runv, "c1") == before_mib
    assert runv.state_of("c1")["status"] == "running"
    print(f"grow (512 MiB + 1 vCPU) {grow_s:.2f}s, shrink (512 MiB for 128 MiB) {shrink_s:.2f}s")
    runv("delete", "--force", "c1")


def test_pod_vm_grows_as_containers_join(runv: Runv) -> None:
    """A container joining a pod with limits grows the pod's VM; one beyond the maximum is
    refused with nothing changed; the VM gives the memory back when the container leaves."""
    sandbox = runv.bundle(["sleep", "600"], annotated("sandbox", "pod1", "9p"))
    runv("run", "--bundle", str(sandbox), "--detach", "pod1")
    before_mib = _mem_total_mib(runv, "pod1")
    qemu = _qemu_pid(runv, "pod1")

    def member(memory: int, quota: int) -> Any:
        def edit(spec: dict[str, Any]) -> None:
            annotated("container", "pod1", "9p")(spec)
            spec["linux"]["resources"] = {"memory": {"limit": memory},
                                          "cpu": {"quota": quota, "period": 100000}}
        return edit

    runv("run", "--bundle", str(runv.bundle(["sleep", "600"], member(256 * MIB, 150000))),
         "--detach", "c1")
    assert _mem_total_mib(runv, "pod1") == before_mib + 256
    assert _cpus_online(runv, "pod1") == "0-1"
    assert _dimm_mappings_mib(qemu) == [256]

    refused = runv("create", "--bundle", str(runv.bundle(["true"], member(16 << 30, 100000))),
                   "c2", check=False)
    assert refused.returncode != 0 and b"max_memory_mib" in refused.stderr, refused.stderr
    assert _mem_total_mib(runv, "pod1") == before_mib + 256
    assert _dimm_mappings_mib(qemu) == [256]

    # The memory goes back after the delete has answered.
    runv("delete", "--force", "c1")
    deadline = time.monotonic() + 60
    while _dimm_mappings_mib(qemu):
        assert time.monotonic() < deadline, "the DIMM stayed"
        time.sleep(0.2)
    assert _mem_total_mib(runv, "pod1") == before_mib
    runv("delete", "--force", "pod1")


def test_a_cold_booted_pc_vm_grows_with_its_vhost_user_devices(runv: Runv) -> None:
    """Cold boot on machine pc: the boot RAM is a shared memfd that the vsock backend (and
    virtiofsd) map; they get the DIMM's memory too, and the agent keeps answering over vsock."""
    runv.config.write_text(runv.config.read_text().replace(
        "[hypervisor]\n", 'template = "off"\n[hypervisor]\nmachine = "pc"\n', 1))
    runv("run", "--bundle", str(runv.bundle(["sleep", "600"])), "--detach", "c1")
    before_mib = _mem_total_mib(runv, "c1")
    runv("update", "--memory", "300m", "c1")
    assert _mem_total_mib(runv, "c1") == before_mib + 384
    # Page cache (movable memory, so mostly in the DIMM now) written through virtio-fs to the
    # host, whose virtiofsd must reach the DIMM's pages.
    runv("exec", "c1", "sh", "-c", "head -c 40000000 /dev/zero > /work/big")
    big = runv.top / "bundle1" / "rootfs" / "work" / "big"
    assert big.stat().st_size == 40000000
    assert big.read_bytes().count(0) == 40000000
    runv("update", "--resources", "-", "c1",
         input=json.dumps({"memory": {"limit": -1}}).encode())
    assert _mem_total_mib(runv, "c1") == before_mib
    runv("delete", "--force", "c1")
