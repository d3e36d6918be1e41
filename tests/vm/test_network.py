"""The network calls in a real guest with two virtio-net NICs on one QEMU hub (no traffic
leaves QEMU), seen through the agent and from inside a container."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import ARPNeighbor, Interface, IPAddress, Route, Storage
from runv_py.devices import Nic, Share
from runv_py.errors import AgentError
from runv_py.sandbox.guest_vm import GuestVm
from runv_py.vm.qemu.machine import QemuMachine
from tests.vm.test_container import MOUNT, _collect, _spec

MAC0, MAC1, GATEWAY_MAC = "02:52:56:00:00:01", "02:52:56:00:00:02", "02:52:56:00:00:fe"
# Longer than the agent waited for a link before (3 s), shorter than it waits now.
LINK_HELD_DOWN_S = 6.0


async def _run_in_container(agent: AgentClient, cid: str, script: str,
                            namespaces: tuple[str, ...] = ("pid", "mount", "ipc", "uts"),
                            sysfs: bool = False) -> str:
    spec = json.loads(_spec(MOUNT.format(cid), ["sh", "-c", script]))
    spec["linux"]["namespaces"] = [{"type": t} for t in namespaces]
    if sysfs:
        spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                               "options": ["ro"]})
    await agent.create_container(cid, json.dumps(spec).encode(), storages=(
        Storage("9p", "rootfs0", MOUNT.format(cid)),))
    output = asyncio.create_task(_collect(agent.stdio(cid)))
    await agent.start_container(cid)
    assert await agent.wait_process(cid, timeout_s=60) == 0
    await agent.remove_container(cid)
    out = await output
    assert out["stderr"] == b"", out
    return out["stdout"].decode()


def test_interfaces_routes_and_neighbors_in_the_guest_and_a_container(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        t0 = time.monotonic()
        before = {i.hw_addr: i for i in await agent.list_interfaces()}
        first_call = time.monotonic() - t0
        t0 = time.monotonic()
        await agent.list_interfaces()
        print(f"ListInterfaces: first call (imports pyroute2) {first_call:.2f}s, "
              f"second {time.monotonic() - t0:.3f}s")
        assert before[MAC0].mtu == 1500 and before[MAC1].mtu == 1500
        assert not before[MAC0].up and before[MAC0].type == ""

        net0 = await agent.update_interface(Interface(
            name="net0", hw_addr=MAC0, mtu=1400,
            ip_addresses=(IPAddress("10.10.0.2", 24), IPAddress("fd10::2", 64, "ipv6"))))
        assert net0.name == "net0" and net0.mtu == 1400 and net0.up
        assert {(a.address, a.prefix_len, a.family) for a in net0.ip_addresses} >= {
            ("10.10.0.2", 24, "ipv4"), ("fd10::2", 64, "ipv6")}
        # Updating again replaces the addresses.
        await agent.update_interface(Interface(
            name="net1", hw_addr=MAC1, mtu=9000,
            ip_addresses=(IPAddress("10.20.0.9", 24),)))
        net1 = await agent.update_interface(Interface(
            name="net1", hw_addr=MAC1, mtu=9000,
            ip_addresses=(IPAddress("10.20.0.2", 24), IPAddress("fd20::2", 64))))
        addresses = {(a.address, a.prefix_len) for a in net1.ip_addresses}
        assert ("10.20.0.9", 24) not in addresses
        assert {("10.20.0.2", 24), ("fd20::2", 64)} <= addresses
        assert any(a.address.startswith("fe80::") for a in net1.ip_addresses)  # kept

        # The 172.16/12 gateway is reachable only through a link route later in the list.
        stale = await agent.update_routes((Route("10.99.0.0/16", gateway="10.20.0.1"),))
        assert Route("10.99.0.0/16", "10.20.0.1", "net1", family="ipv4") in stale
        routes = await agent.update_routes((
            Route("default", gateway="10.10.0.1"),
            Route("172.16.0.0/12", gateway="192.168.5.1", device="net1"),
            Route("192.168.5.0/24", device="net1", scope=253),
            Route("default", gateway="fd10::1", device="net0"),
            Route("10.10.0.0/24", device="net0", scope=253),  # the kernel's: stays as it is
        ))
        await agent.add_arp_neighbors((ARPNeighbor("10.10.0.1", "net0", GATEWAY_MAC),
                                       ARPNeighbor("fd10::1", "net0", GATEWAY_MAC)))

        assert routes == await agent.list_routes()
        assert not [r for r in routes if r.dest == "10.99.0.0/16"]  # replaced
        for want in (Route("default", "10.10.0.1", "net0", family="ipv4"),
                     Route("172.16.0.0/12", "192.168.5.1", "net1", family="ipv4"),
                     Route("192.168.5.0/24", "", "net1", scope=253, family="ipv4"),
                     Route("10.10.0.0/24", "", "net0", "10.10.0.2", 253, "ipv4"),
                     Route("default", "fd10::1", "net0", family="ipv6"),
                     Route("fd20::/64", "", "net1", family="ipv6")):
            assert want in routes, (want, routes)
        listed = {i.name: i for i in await agent.list_interfaces()}
        assert listed["net0"] == net0 and listed["net1"].mtu == 9000 and "lo" in listed

        # A container without its own network namespace shares the guest's.
        out = await _run_in_container(agent, "shared", "ip addr; ip route; ip -6 route; "
                                                       "ip neigh")
        for text in ("net0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400",
                     f"link/ether {MAC0}", "inet 10.10.0.2/24", "inet6 fd10::2/64",
                     "net1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000", "inet 10.20.0.2/24",
                     "default via 10.10.0.1 dev net0", "172.16.0.0/12 via 192.168.5.1 dev net1",
                     "192.168.5.0/24 dev net1 scope link", "default via fd10::1 dev net0"):
            assert text in out, (text, out)
        for ip in ("10.10.0.1", "fd10::1"):  # busybox puts "used ... probes" in between
            assert re.search(rf"^{ip} dev net0 lladdr {GATEWAY_MAC} .*PERMANENT$", out, re.M), out
        own = await _run_in_container(agent, "own", "ip -o link",
                                      ("pid", "mount", "ipc", "uts", "network"))
        assert "lo:" in own and "net0" not in own

        bad: list[tuple[object, str, str]] = [
            (agent.update_interface(Interface(hw_addr="02:52:56:00:00:77")),
             "NOT_FOUND", "interface.hw_addr: no interface has address 02:52:56:00:00:77"),
            (agent.update_interface(Interface(name="nope0")),
             "NOT_FOUND", "interface.name: no interface named 'nope0'"),
            (agent.update_interface(Interface(hw_addr=MAC0, ip_addresses=(
                IPAddress("10.10.0.300", 24),))),
             "INVALID_ARGUMENT", "interface.ip_addresses[0].address: '10.10.0.300'"),
            (agent.update_interface(Interface(hw_addr=MAC0, ip_addresses=(
                IPAddress("10.10.0.2", 24), IPAddress("fd10::2", 129)))),
             "INVALID_ARGUMENT", "interface.ip_addresses[1].prefix_len: 129"),
            (agent.update_interface(Interface(hw_addr=MAC0, ip_addresses=(
                IPAddress("10.10.0.2", 24, "ipv6"),))),
             "INVALID_ARGUMENT", "interface.ip_addresses[0].family"),
            (agent.update_interface(Interface(hw_addr="02:52:56:00:00")),
             "INVALID_ARGUMENT", "interface.hw_addr"),
            (agent.update_interface(Interface(hw_addr=MAC0, name="net1")),
             "ALREADY_EXISTS", "interface.name"),
            # n0 offers an MTU of 1500 at most (host_mtu): the kernel refuses more.
            (agent.update_interface(Interface(hw_addr=MAC0, mtu=1600)),
             "INVALID_ARGUMENT", "interface.mtu: MTU 1600 on net0"),
            (agent.update_routes((Route("10.40.0.0/16", device="eth9"),)),
             "NOT_FOUND", "routes[0].device: no interface named 'eth9'"),
            (agent.update_routes((Route("10.40.0.0/16", gateway="10.77.0.1"),)),
             "INVALID_ARGUMENT", "routes[0]: 10.40.0.0/16 via 10.77.0.1: ENETUNREACH"),
            (agent.update_routes((Route("10.40.0.1/16", device="net0"),)),
             "INVALID_ARGUMENT", "routes[0].dest"),
            (agent.update_routes((Route("default", gateway="fd10::1", family="ipv4"),)),
             "INVALID_ARGUMENT", "routes[0].gateway"),
            (agent.update_routes((Route("10.40.0.0/16"),)),
             "INVALID_ARGUMENT", "routes[0].device: is required"),
            (agent.update_routes((Route("10.40.0.0/16", device="net0", scope=7),)),
             "INVALID_ARGUMENT", "routes[0].scope"),
            (agent.add_arp_neighbors((ARPNeighbor("10.10.0.5", "net0", "zz"),)),
             "INVALID_ARGUMENT", "neighbors[0].ll_addr"),
            (agent.add_arp_neighbors((ARPNeighbor("10.10.0.5", "net7", GATEWAY_MAC),)),
             "NOT_FOUND", "neighbors[0].device"),
            (agent.add_arp_neighbors((ARPNeighbor("", "net0", GATEWAY_MAC),)),
             "INVALID_ARGUMENT", "neighbors[0].to_ip.address: is required"),
        ]
        for call, code, text in bad:
            with pytest.raises(AgentError) as info:
                await call  # type: ignore[misc]
            assert f"{code}: {text}" in str(info.value)
            assert await agent.check()
        # Refused requests changed nothing.
        assert {i.name: i for i in await agent.list_interfaces()}["net0"] == net0
        assert await agent.list_routes() == routes

    async def main() -> None:
        nics = (Nic("n0", MAC0, mtu=1500), Nic("n1", MAC1))
        async with await GuestVm.boot(
                runtime_config, shares=(Share("rootfs0", busybox_rootfs, readonly=True),),
                nics=nics) as sandbox:
            assert sandbox.agent is not None
            await body(sandbox.agent)

    asyncio.run(main())


def test_an_interface_is_configured_once_its_link_carries_frames(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    """UpdateInterface brings the NIC up and returns only once the guest can send on it: its
    carrier is on and the kernel has attached its transmit queue. Before that the guest drops
    what it sends (docs/networking.md, "A NIC brought up before it can send"). Here the host
    holds the NIC's link down while the agent brings it up."""
    async def main() -> None:
        async with await GuestVm.boot(
                runtime_config, shares=(Share("rootfs0", busybox_rootfs, readonly=True),),
                nics=(Nic("n0", MAC0),)) as sandbox:
            agent, machine = sandbox.agent, sandbox.machine
            assert agent is not None and isinstance(machine, QemuMachine)
            await machine.qmp.execute("set_link", {"name": "nic-n0", "up": False})
            # The guest has seen its carrier go (probe: off, on; now off again).
            await _run_in_container(agent, "off", "until [ $(cat /sys/class/net/eth0/"
                                    "carrier_down_count) -ge 2 ]; do sleep 0.1; done", sysfs=True)
            update = asyncio.create_task(agent.update_interface(Interface(
                name="net0", hw_addr=MAC0, ip_addresses=(IPAddress("fd10::2", 64, "ipv6"),))))
            done, _ = await asyncio.wait({update}, timeout=LINK_HELD_DOWN_S)
            assert not done, f"UpdateInterface returned without a carrier: {update.result()}"
            await machine.qmp.execute("set_link", {"name": "nic-n0", "up": True})
            net0 = await asyncio.wait_for(update, 30)
            assert net0.up
            out = await _run_in_container(agent, "on", "cat /sys/class/net/net0/carrier "
                                          "/sys/class/net/net0/operstate; ip -6 -o addr "
                                          "show dev net0", sysfs=True)
            lines = out.splitlines()
            assert lines[:2] == ["1", "up"], out
            # IPv6 took the link as ready: it made the link-local address, and the host's
            # address is usable at once.
            (global_line,) = [line for line in lines if "fd10::2/64" in line]
            assert "inet6 fe80::" in out and "tentative" not in global_line, out

    asyncio.run(main())
