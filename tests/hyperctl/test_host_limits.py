"""hyperctl's bounds on the host (sandbox/host_cgroup.py): `--cpus 0.5` costs the host at most
half a CPU (the sandbox's host cgroup holds QEMU and its helpers under that quota; only the
monitor is outside it), `--memory` is a host memory limit of the VM's RAM plus the stated
overhead, and `--blkio-weight` reaches the host cgroup's weight file where the host's IO
scheduler has one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runv_py.sandbox import host_cgroup
from tests.hyperctl.conftest import Hyperctl
from tests.vm.conftest import processes_mentioning

pytestmark = pytest.mark.vm

TENANT = "gl-limits"
CFS_SLACK = 0.05       # CFS lets a group run a little past its quota within a period
MONITOR_OVERHEAD = 0.05  # the container's monitor, outside the host cgroup: CPU it may use
SAMPLE_S = 5.0
BASE_VM_MIB = 256      # [hypervisor] memory_mib of the test config (the default)


def _cgroup_dirs(cid: str) -> dict[str, Path]:
    found = {}
    for path in Path("/sys/fs/cgroup").glob(f"*/hyperctl/{TENANT}/{cid[:16]}"):
        for controller in path.parents[2].name.split(","):
            found[controller] = path
    return found


def _cpu_seconds(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def test_cpus_memory_and_io_weight_bound_the_sandbox_on_the_host(hyperctl: Hyperctl) -> None:
    hyperctl("--tenant", TENANT, "run", "-d", "--name", "busy", "--cpus", "0.5",
             "--memory", "256m", "--blkio-weight", "300", "busybox", "sh", "-c",
             "while :; do :; done")
    cid = json.loads(hyperctl("--tenant", TENANT, "inspect", "busy").stdout)[0]["id"]
    dirs = _cgroup_dirs(cid)
    assert {"cpu", "cpuacct", "memory", "blkio"} <= set(dirs), dirs

    # QEMU and the supervisor are in the host cgroup, under the quota
    inside = {int(p) for p in (dirs["cpuacct"] / "cgroup.procs").read_text().split()}
    assert any(Path(f"/proc/{pid}/comm").read_text().startswith("qemu")
               for pid in inside), inside
    assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    outside = {int(line.split(":")[0]) for line in processes_mentioning(cid)} - inside

    usage = dirs["cpuacct"] / "cpuacct.usage"
    time.sleep(1.0)
    start, start_outside, t0 = int(usage.read_text()), _cpu_seconds(outside), time.monotonic()
    time.sleep(SAMPLE_S)
    elapsed = time.monotonic() - t0
    cpus = (int(usage.read_text()) - start) / 1e9 / elapsed
    monitor_cpus = (_cpu_seconds(outside) - start_outside) / elapsed
    assert 0.05 < cpus <= 0.5 + CFS_SLACK, cpus    # busy, and held to half a CPU
    assert monitor_cpus <= MONITOR_OVERHEAD, monitor_cpus

    # guest RAM (the VM's base plus --memory) plus the host processes' stated overhead
    overhead = host_cgroup.HOST_OVERHEAD_MIB + host_cgroup.TCG_CODE_CACHE_MIB
    assert int((dirs["memory"] / "memory.limit_in_bytes").read_text()) == \
        (BASE_VM_MIB + 256 + overhead) << 20

    # the io weight, in whichever weight file this host's IO scheduler offers; with none
    # (mq-deadline or none on every disk) there is nothing on the host to set
    weights = [dirs["blkio"] / n for n in ("blkio.bfq.weight", "blkio.weight")
               if (dirs["blkio"] / n).exists()]
    if weights:
        assert weights[0].read_text().split()[-1] == "300", weights[0]
    else:
        schedulers = " ".join(p.read_text() for p in Path("/sys/block").glob(
            "*/queue/scheduler"))
        assert "bfq" not in schedulers and "cfq" not in schedulers, schedulers

    hyperctl("--tenant", TENANT, "rm", "-f", "busy")
    assert not _cgroup_dirs(cid)
