"""Sandboxes side by side: separate networks stay apart, a port published by CNI's portmap
reaches the container from the host, and a killed supervisor does not break the caller's
namespace."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from runv_py.network import managed
from runv_py.network.cni import BridgeNetwork, PortMapping
from tests.cli.conftest import Runv
from tests.vm.conftest import processes_mentioning

from .conftest import Lab, fetch, peer_http, run_output, sh, with_netns


def start_detached(runv: Runv, cid: str, args: list[str], edit: object,
                   tmp_path: Path) -> Path:
    bundle = runv.bundle(args, edit)
    with open(tmp_path / f"{cid}.out", "wb") as out:
        runv("create", "--bundle", str(bundle), cid, stdout=out, stderr=subprocess.STDOUT)
    runv("start", cid)
    return bundle


def test_two_sandboxes_on_separate_networks_cannot_reach_each_other(
        runv: Runv, lab: Lab, tmp_path: Path) -> None:
    net = lab.subnet
    # The same subnet on both sides: only a link the runtime made could join them.
    c1, _ = lab.pair(5, suffix="1")
    c2, p2 = lab.pair(5, suffix="2", host=3)
    peer_http(lab, p2, f"10.{net}.5.1")
    start_detached(runv, "s1", ["httpd", "-f", "-p", "8080", "-h", "/"],
                   with_netns(lab.path(c1)), tmp_path)
    script = (f"wget -q -T 3 -O - http://10.{net}.5.2:8080/etc/passwd && echo reached-s1; "
              f"wget -q -O - http://10.{net}.5.1:8080/ | head -n 1")
    result = run_output(runv, "s2", script, with_netns(lab.path(c2)))
    out = result.stdout.decode()
    assert "mss=" in out, out + result.stderr.decode()  # its own network works
    assert "reached-s1" not in out and "root:x" not in out
    runv("delete", "--force", "s1")
    assert lab.mirror_state(c1) == [] and lab.mirror_state(c2) == []


def test_published_port_through_cni_bridge_and_portmap(runv: Runv, lab: Lab,
                                                       tmp_path: Path) -> None:
    """What `hyperctl run --network default -p HOST:GUEST` does, on a bridge of the test's."""
    net = lab.subnet
    bridge = f"rvb{os.getpid()}"[:15]
    lab.bridges.append(bridge)
    network = BridgeNetwork(name=f"rvtest{os.getpid()}", bridge=bridge,
                            subnet=f"10.{net}.6.0/24", data_dir=tmp_path / "ipam")
    host_port = 20000 + os.getpid() % 10000
    lease = asyncio.run(managed.attach(f"rvp{os.getpid()}", network,
                                       (PortMapping(host_port, 8080),)))
    lab.names.append(Path(lease.netns).name)
    try:
        assert managed.Lease.from_json(lease.to_json()) == lease
        gateway = f"10.{net}.6.1"
        assert lease.addresses[0].startswith(f"10.{net}.6.")
        start_detached(runv, "pp", ["sh", "-c", "echo published > /index.html; "
                                    "exec httpd -f -p 8080 -h /"],
                       with_netns(lease.netns), tmp_path)
        body = fetch(f"http://{gateway}:{host_port}/index.html")
        assert body == b"published\n", f"no answer through {gateway}:{host_port}"
        runv("delete", "--force", "pp")
        assert lab.mirror_state(Path(lease.netns).name) == []
    finally:
        asyncio.run(managed.detach(lease))
    assert not Path(lease.netns).exists()
    assert f"--dport {host_port}" not in sh("iptables", "-t", "nat", "-S")
    assert not list((tmp_path / "ipam").glob(f"{network.name}/10.*"))


def test_a_killed_supervisor_does_not_break_the_namespace(runv: Runv, lab: Lab,
                                                          tmp_path: Path) -> None:
    net = lab.subnet
    container, peer = lab.pair(7)
    peer_http(lab, peer, f"10.{net}.7.1")

    def kill_supervisor(cid: str) -> None:
        start_detached(runv, cid, ["sleep", "1000"], with_netns(lab.path(container)),
                       tmp_path)
        supervisor = [line for line in processes_mentioning(str(runv.root))
                      if "runv_py.sandbox.supervisor" in line and f"--id {cid}" in line]
        assert len(supervisor) == 1, supervisor
        os.kill(int(supervisor[0].split(":")[0]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any("tap" in s for s in lab.mirror_state(container)):
            assert time.monotonic() < deadline, "the tap outlived QEMU"
            time.sleep(0.2)
        # What a killed runtime leaves: the redirect on the veth, to a tap that is gone.
        assert [s for s in lab.mirror_state(container) if "dev eth0" in s], \
            lab.mirror_state(container)

    # Killed, then `runv delete` (what every container manager calls) cleans up.
    kill_supervisor("k1")
    runv("delete", "--force", "k1")
    assert lab.mirror_state(container) == []
    # Killed and never deleted: the next sandbox on the namespace clears it and works.
    kill_supervisor("k2")
    result = run_output(runv, "k3", f"wget -q -O - http://10.{net}.7.1:8080/ | head -n 1",
                        with_netns(lab.path(container)))
    assert b"mss=" in result.stdout, result.stdout + result.stderr
    runv("delete", "--force", "k2")
    assert lab.mirror_state(container) == []


def test_a_namespace_in_use_by_another_sandbox_is_refused(runv: Runv, lab: Lab,
                                                          tmp_path: Path) -> None:
    net = lab.subnet
    container, peer = lab.pair(15)
    peer_http(lab, peer, f"10.{net}.15.1")
    start_detached(runv, "u1", ["sleep", "1000"], with_netns(lab.path(container)), tmp_path)
    mirrored = lab.mirror_state(container)
    second = runv.bundle(["true"], with_netns(lab.path(container)))
    result = runv("run", "--bundle", str(second), "u2", check=False)
    assert result.returncode == 1
    assert b"another sandbox uses this network namespace" in result.stderr, result.stderr
    assert not (runv.root / "u2").exists()
    assert lab.mirror_state(container) == mirrored  # the first sandbox's mirror is intact
    out = runv("exec", "u1", "sh", "-c", f"wget -q -O - http://10.{net}.15.1:8080/ | "
               "head -n 1").stdout
    assert out.startswith(b"mss="), out
    runv("delete", "--force", "u1")


def test_a_pod_shares_its_network_namespace_and_localhost(runv: Runv, lab: Lab,
                                                          tmp_path: Path) -> None:
    """CRI-style: the pod's sandbox and its container both name the pod's netns; the
    container joins the sandbox's VM, reaches the peer through the pod's NIC and the sandbox
    on localhost."""
    net = lab.subnet
    container, peer = lab.pair(17)
    peer_http(lab, peer, f"10.{net}.17.1")

    def pod(kind: str) -> Any:
        def edit(spec: dict[str, Any]) -> None:
            with_netns(lab.path(container))(spec)
            spec["annotations"] = {"io.kubernetes.cri.container-type": kind,
                                   "io.kubernetes.cri.sandbox-id": "pod1"}
        return edit

    start_detached(runv, "pod1", ["sh", "-c", "echo from-sandbox > /index.html; "
                                  "exec httpd -f -p 127.0.0.1:8081 -h /"], pod("sandbox"),
                   tmp_path)
    member = runv.bundle(["sh", "-c", "for i in $(seq 50); do "
                          "wget -qO- http://127.0.0.1:8081/index.html && break; sleep 0.2; "
                          f"done; wget -qO- http://10.{net}.17.1:8080/ | head -n 1"],
                         pod("container"))
    out = tmp_path / "c1.out"
    with open(out, "wb") as sink:
        runv("create", "--bundle", str(member), "c1", stdout=sink)
    runv("start", "c1")
    runv.wait_status("c1", "stopped")
    text = out.read_text()
    assert text.startswith("from-sandbox\nmss="), text
    assert len([s for s in lab.mirror_state(container) if s.startswith("tap")]) == 1
    runv("delete", "c1")
    runv("delete", "--force", "pod1")
    assert lab.mirror_state(container) == []
