"""The reconciler against a host crash: two detached hyperctl containers on runv-py's CNI
network with a published port each; every host process of one (monitor, supervisor, QEMU,
vsock backend, virtiofsd) is SIGKILLed at once. What it held is then orphaned: its VM
directory, host cgroups, network namespace, nftables tables, IPAM lease, portmap chain and
MASQUERADE rule. `hyperctl system prune` lists them and removes nothing; `runv gc` removes each
of them, one line each, and nothing of the other container, which still runs commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runv_py import child
from runv_py.sandbox import vm_dir
from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401  (fixture)

from .conftest import Lab, sh

RUNV = str(Path(sys.executable).parent / "runv")


def _cgroups(workload_id: str) -> list[Path]:
    return sorted(Path("/sys/fs/cgroup").glob(f"*/hyperctl/_/{workload_id[:16]}"))


def _objects(tool: Hyperctl, workload_id: str, cni: Path) -> dict[str, object]:
    """Everything of the workload's that the host shows, by kind."""
    sandbox = f"hc-{workload_id[:12]}"
    nat = sh("iptables", "-w", "-t", "nat", "-S")
    return {
        "vm_dir": vm_dir.path_for(tool.state, tool.root, workload_id).exists(),
        "cgroups": _cgroups(workload_id),
        "netns": Path(f"/run/netns/runv-{sandbox}").exists(),
        "tables": sorted(line for line in sh("nft", "list", "tables").splitlines()
                         if sandbox in line),
        "lease": sorted(p.name for p in (cni / "runv").glob("10.*")
                        if p.read_text().startswith(sandbox)),
        "portmap": [line for line in nat.splitlines() if f'id: \\"{sandbox}\\"' in line],
        "masquerade": [line for line in nat.splitlines()
                       if f"published ports of {sandbox}" in line],
    }


def _host_processes(tool: Hyperctl, workload_id: str) -> list[int]:
    owner = vm_dir.owner(vm_dir.path_for(tool.state, tool.root, workload_id))
    assert owner is not None
    meta = json.loads((tool.data / "containers" / workload_id / "meta.json").read_text())
    return [meta["monitor_pid"], *child.with_descendants(owner[0])]


def test_gc_removes_what_a_killed_sandbox_left_and_nothing_else(
        hyperctl: Hyperctl, lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    bridge = f"rvg{os.getpid()}"[:15]
    lab.bridges.append(bridge)
    cni = tmp_path / "cni"
    hyperctl.config.write_text(hyperctl.config.read_text() + (
        f'[network]\nbridge = "{bridge}"\nsubnet = "10.{lab.subnet}.17.0/24"\n'
        f'cni_data_dir = "{cni}"\n'))
    port = 30000 + os.getpid() % 10000
    ids = [hyperctl("run", "-d", "--name", name, "--network", "default", "-p",
                    f"{port + i}:8080", "busybox", "sleep", "3600").stdout.decode().strip()
           for i, name in enumerate(("crashed", "alive"))]
    crashed, alive = ids
    before_alive = _objects(hyperctl, alive, cni)
    before = _objects(hyperctl, crashed, cni)
    assert all(before.values()), before

    # A host crash: every host process of the sandbox stopped, then killed, together.
    pids = _host_processes(hyperctl, crashed)
    assert len(pids) >= 3, pids  # monitor, supervisor, QEMU (and its backends)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while any(child.proc_start_time(p) is not None for p in pids):
        assert time.monotonic() < deadline, "killed processes still there"
        time.sleep(0.1)
    left = _objects(hyperctl, crashed, cni)
    assert all(left.values()), f"the crash left less than expected: {left}"

    # The dry run lists every kind and removes nothing.
    listed = hyperctl("system", "prune").stdout.decode()
    for kind in ("sandbox-dir", "cgroup", "netns", "nft-table", "ipam-lease", "portmap-chain",
                 "masquerade-rule", "network-lease", "share-dir"):
        assert kind in listed, (kind, listed)
    assert f"hc-{alive[:12]}" not in listed and alive[:16] not in listed
    assert _objects(hyperctl, crashed, cni) == left

    done = subprocess.run([RUNV, "gc"], env=hyperctl.env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("removed ") for line in lines), done.stdout
    after = _objects(hyperctl, crashed, cni)
    assert not any(after.values()), after
    assert _objects(hyperctl, alive, cni) == before_alive
    assert hyperctl("exec", "alive", "echo", "still here").stdout == b"still here\n"

    # The crashed container is recorded as exited; a second pass finds nothing.
    assert "Exited" in hyperctl("ps", "-a").stdout.decode()
    again = hyperctl("system", "prune", "-f").stdout.decode()
    assert again.strip().endswith("removed 0 of 0 object(s)"), again
    hyperctl("rm", "-f", "crashed", "alive")
