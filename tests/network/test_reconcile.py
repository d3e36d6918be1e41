"""The reconciler against a host crash. hyperctl: two detached containers on runv-py's CNI
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runv_py import child
from runv_py.sandbox import vm_dir
from tests.cli.conftest import Runv
from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401  (fixture)

from .conftest import Lab, sh, with_netns

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


def crash(pids: list[int]) -> None:
    """Every process stopped, then killed, together; gone (reaped, if one was ours)."""
    starts = {pid: child.proc_start_time(pid) for pid in pids}
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while any(start is not None and child.is_running(pid, start)
              for pid, start in starts.items()):
        assert time.monotonic() < deadline, "killed processes still there"
        time.sleep(0.1)
    for pid in pids:
        child.reap_if_child(pid)


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
    crash(pids)
    left = _objects(hyperctl, crashed, cni)
    assert all(left.values()), f"the crash left less than expected: {left}"

    # The dry run lists every kind and removes nothing.
    listed = hyperctl("system", "prune").stdout.decode()
    print(listed)
    for kind in ("sandbox-dir", "cgroup", "netns", "nft-table", "ipam-lease", "portmap-chain",
                 "masquerade-rule", "network-lease", "share-dir"):
        assert kind in listed, (kind, listed)
    assert f"hc-{alive[:12]}" not in listed and alive[:16] not in listed
    assert _objects(hyperctl, crashed, cni) == left

    done = subprocess.run([RUNV, "gc"], env=hyperctl.env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
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


def test_gc_after_a_crash_of_runv_sandboxes_in_given_namespaces(runv: Runv, lab: Lab,
                                                                 tmp_path: Path) -> None:
    """The OCI CLI's side: two containers (with stand-ins and host cgroups) in namespaces of
    their own, as a container manager hands them over; one crashes. runv gc removes its VM
    directory, its cgroup, its shared-dir mount point and the tc redirect to its gone tap,
    and nothing of the other's."""
    cgroup_parent = f"runv-gc-test-{os.getpid()}"
    namespaces = {cid: lab.pair(8 + i, suffix=cid)[0] for i, cid in enumerate(("a", "b"))}

    def edit(cid: str) -> Callable[[dict[str, Any]], None]:
        def apply(spec: dict[str, Any]) -> None:
            with_netns(lab.path(namespaces[cid]))(spec)
            spec["linux"]["cgroupsPath"] = f"/{cgroup_parent}/{cid}"
        return apply

    for cid in namespaces:
        bundle = runv.bundle(["sleep", "1000"], edit(cid))
        with open(tmp_path / f"{cid}.out", "wb") as out:
            runv("create", "--bundle", str(bundle), cid, stdout=out, stderr=subprocess.STDOUT)
        runv("start", cid)

    def objects(cid: str) -> dict[str, object]:
        return {"vm_dir": runv.sandbox_dir(cid).exists(),
                "share": (runv.state / "shares" / runv.sandbox_dir(cid).name).exists(),
                "cgroups": sorted(Path("/sys/fs/cgroup").glob(f"*/{cgroup_parent}/{cid}")),
                "redirect": [s for s in lab.mirror_state(namespaces[cid]) if "qdisc" in s]}

    before_b = objects("b")
    standin = runv.state_of("a")["pid"]
    pids = [standin, *child.with_descendants(runv.supervisor_pid("a"))]
    crash(pids)
    left = objects("a")
    assert all(left.values()), f"the crash left less than expected: {left}"

    done = subprocess.run([RUNV, "--log-format", "json", "gc"], env=runv.env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    removed = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(item["removed"] for item in removed), removed
    kinds = {item["kind"] for item in removed
             if runv.sandbox_dir("a").name in item["name"] + item["owner"]
             or cgroup_parent in item["name"] or namespaces["a"] in item["name"]}
    assert kinds >= {"sandbox-dir", "share-dir", "cgroup", "tc-redirect"}, removed
    assert not any(objects("a").values()), objects("a")
    assert objects("b") == before_b
    assert runv("exec", "b", "echo", "still here").stdout == b"still here\n"
    assert runv.state_of("a")["status"] == "stopped"
    for cid in namespaces:
        runv("delete", "--force", cid)
    for path in sorted(Path("/sys/fs/cgroup").glob(f"*/{cgroup_parent}")):
        path.rmdir()
