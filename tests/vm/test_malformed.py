"""A corpus of malformed requests against a real guest: valid requests with one field made wrong
at a time. Each must get its own gRPC status naming the field, and afterwards the agent still
answers and runs containers under the same ids."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from runv_py import config
from runv_py.agent._pb import hyperstart_pb2 as pb
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import ARPNeighbor, Interface, IPAddress, Route, Storage
from runv_py.devices import Share
from runv_py.errors import AgentError
from runv_py.sandbox.guest_vm import GuestVm
from tests.vm.test_container import MOUNT, _collect, _spec

DELETE = object()
INVALID, NOT_FOUND, PRECONDITION, EXISTS = (
    "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS")


def _mutated(base: dict[str, Any], path: str, value: object) -> bytes:
    """base with the field at the dotted path (list indexes as numbers) set or deleted."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    key_: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key_]
    else:
        node[key_] = value
    return json.dumps(doc).encode()


SPEC_CASES: list[tuple[str, object, str, str]] = [
    ("process", DELETE, INVALID, "spec: process: is required"),
    ("process", "sh", INVALID, "spec: process: must be an object"),
    ("process.args", "true", INVALID, "process.args: must be a list"),
    ("process.args", [], INVALID, "process.args: must name the program"),
    ("process.args", [1], INVALID, "process.args[0]: must be a string"),
    ("process.args", ["true\0x"], INVALID, "process.args[0]: must not contain NUL"),
    ("process.env", ["NOEQUALS"], INVALID, "process.env[0]: must be KEY=VALUE"),
    ("process.env", {"A": "1"}, INVALID, "process.env: must be a list"),
    ("process.cwd", "relative", INVALID, "process.cwd: must be an absolute path"),
    ("process.cwd", "/a/../..", INVALID, "process.cwd: must not contain '..'"),
    ("process.user", {"uid": -1}, INVALID, "process.user.uid: must be an integer"),
    ("process.user", {"uid": 2**32}, INVALID, "process.user.uid: must be an integer"),
    ("process.user", {"uid": "0"}, INVALID, "process.user.uid: must be an integer"),
    ("process.user", {"uid": 10**400}, INVALID, "process.user.uid: must be an integer"),
    ("process.terminal", "yes", INVALID, "process.terminal: must be true or false"),
    ("process.consoleSize", {"height": 70000, "width": 80}, INVALID,
     "process.consoleSize.height"),
    ("process.rlimits", [{"type": "RLIMIT_NOPE", "soft": 1, "hard": 1}], INVALID,
     "process.rlimits[0].type"),
    ("process.capabilities", {"bounding": ["CAP_NOPE"]}, INVALID,
     "process.capabilities.bounding"),
    ("process.oomScoreAdj", 5000, INVALID, "process.oomScoreAdj"),
    ("root", DELETE, INVALID, "root"),
    ("root.path", "relative/root", INVALID, "root.path: 'relative/root' must be an absolute"),
    ("root.path", "/run/../etc", INVALID, "root.path: '/run/../etc' must be an absolute"),
    ("root.path", "", INVALID, "root.path: is required"),
    ("root.path", "/no/such/root", INVALID, "root.path: /no/such/root is not a directory"),
    ("root.readonly", "no", INVALID, "root.readonly: must be true or false"),
    ("hostname", 7, INVALID, "hostname: must be a string"),
    ("mounts", {"destination": "/x"}, INVALID, "mounts: must be a list"),
    ("mounts.0", "proc", INVALID, "mounts[0]: must be an object"),
    ("mounts.0.destination", "proc", INVALID, "mounts[0].destination: must be an absolute"),
    ("mounts.0.destination", "/../proc", INVALID, "mounts[0].destination: must not contain"),
    ("mounts.0.options", "ro", INVALID, "mounts[0].options: must be a list"),
    ("linux.namespaces", [{"type": "nope"}], INVALID, "linux.namespaces[0].type"),
    ("linux.namespaces", [{"type": "pid"}, {"type": "pid"}], INVALID, "linux.namespaces"),
    ("linux.namespaces", [{"type": "network", "path": "relative"}], INVALID,
     "linux.namespaces[0].path"),
    ("linux.namespaces", [{"type": "pid"}], INVALID, "a new mount namespace is required"),
    ("linux.namespaces", [{"type": "mount", "path": "/proc/1/ns/mnt"}], INVALID,
     "a new mount namespace is required"),
    ("linux", None, INVALID, "a new mount namespace is required"),
    ("linux.namespaces", [{"type": "mount"}, {"type": "network", "path": "/no/such/ns"}],
     PRECONDITION, "/no/such/ns"),
    ("linux.resources", {"memory": {"limit": "1G"}}, INVALID, "linux.resources.memory.limit"),
    ("linux.resources", {"memory": {"limit": -7}}, INVALID, "linux.resources.memory.limit"),
    # The kernel would wrap this to 0 and kill the container at once.
    ("linux.resources", {"memory": {"limit": 2**70}}, INVALID, "linux.resources.memory.limit"),
    ("linux.resources", {"cpu": {"quota": 2**64}}, INVALID, "linux.resources.cpu.quota"),
    ("linux.resources", {"pids": {"limit": True}}, INVALID, "linux.resources.pids.limit"),
    ("linux.resources", {"cpu": {"cpus": "0-9999"}}, PRECONDITION, "cgroup: cpuset.cpus"),
    ("linux.sysctl", {"../../etc/x": "1"}, INVALID, "linux.sysctl"),
    ("linux.sysctl", ["net.ipv4.ip_forward=1"], INVALID, "linux.sysctl"),
    ("linux.seccomp", {"defaultAction": "SCMP_ACT_NOPE"}, INVALID, "seccomp"),
    ("linux.uidMappings", [{"containerID": 0, "hostID": 0}], INVALID, "linux.uidMappings[0]"),
    ("linux.devices", [{"path": "/dev/x", "type": "q", "major": 1, "minor": 1}], INVALID,
     "linux.devices[0].type"),
]


async def _expect(call: Callable[[], Awaitable[object]], code: str, text: str) -> str | None:
    """None if the call failed with `code` and a message containing `text`, else what went
    wrong."""
    try:
        await call()
    except AgentError as exc:
        if f": {code}: " in str(exc) and text in str(exc):
            return None
        return f"expected {code} with {text!r}, got: {exc}"
    return f"expected {code} with {text!r}, but it succeeded"


async def _chunks_of(agent: AgentClient, cid: str) -> dict[str, bytes]:
    return await _collect(agent.stdio(cid))


def test_malformed_requests_get_their_status_and_the_agent_keeps_working(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        rootfs = MOUNT.format("live")
        storage = (Storage("9p", "rootfs0", rootfs),)
        await agent.create_container("live", _spec(rootfs, ["sleep", "600"]), storages=storage,
                                     stdio=False)
        await agent.start_container("live")
        # One 9p tag mounts once: the other containers use live's root, with no storage.
        await agent.create_container("fresh", _spec(rootfs, ["true"]), stdio=False)
        await agent.create_container("noprog", _spec(rootfs, ["/bin/no-such-program"]),
                                     stdio=False)
        base = json.loads(_spec(rootfs, ["true"]))
        process = {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/"}

        def create(cid: str, spec: bytes, storages: tuple[Storage, ...] = ()
                   ) -> Callable[[], Awaitable[None]]:
            return lambda: agent.create_container(cid, spec, storages=storages, stdio=False)

        def exec_(cid: str, eid: str, body: bytes) -> Callable[[], Awaitable[None]]:
            return lambda: agent.exec_process(cid, eid, body, stdio=False)

        valid = json.dumps(base).encode()
        proc = json.dumps(process).encode()
        cases: list[tuple[str, Callable[[], Awaitable[object]], str, str]] = [
            (f"spec {path}={value!r}", create("x", _mutated(base, path, value)), code, text)
            for path, value, code, text in SPEC_CASES]
        cases += [
            # CreateContainer
            ("spec not JSON", create("x", b"{not json"), INVALID, "not valid JSON"),
            ("spec empty", create("x", b""), INVALID, "not valid JSON"),
            ("spec not UTF-8", create("x", b'{"a": "\xff"}'), INVALID, "not valid JSON"),
            ("spec a list", create("x", b"[]"), INVALID, "must be an object"),
            ("spec nested deep", create("x", b"[" * 100_000 + b"]" * 100_000), INVALID,
             "spec"),
            ("id empty", create("", valid), INVALID, "container id ''"),
            ("id ..", create("..", valid), INVALID, "container id '..'"),
            ("id with /", create("a/../../b", valid), INVALID, "container id"),
            ("id with NUL", create("a\0b", valid), INVALID, "container id"),
            ("id too long", create("x" * 300, valid), INVALID, "container id"),
            ("id taken", create("live", valid), EXISTS, "'live' already exists"),
            ("storage driver", create("x", valid, (Storage("nfs", "t", MOUNT.format("x")),)),  # type: ignore[arg-type]
             INVALID, "storage driver 'nfs'"),
            ("storage mount_point relative",
             create("x", valid, (Storage("9p", "rootfs0", "run/x"),)), INVALID, "mount_point"),
            ("storage mount_point ..",
             create("x", valid, (Storage("9p", "rootfs0", "/run/../x"),)), INVALID,
             "mount_point"),
            ("storage mount_point NUL",
             create("x", valid, (Storage("9p", "rootfs0", "/run/x\0y"),)), INVALID, "NUL"),
            ("storage mount_point too long",
             create("x", valid, (Storage("9p", "rootfs0", "/run/" + "x" * 300),)), INVALID,
             "mount_point"),
            ("storage unknown tag",
             create("x", valid, (Storage("9p", "no-such-tag", MOUNT.format("x")),)), INVALID,
             "no-such-tag"),
            ("storage block device missing",
             create("x", valid, (Storage("block", "/dev/vdz", MOUNT.format("x"), "ext4"),)),
             INVALID, "/dev/vdz"),
            # StartContainer, PauseContainer, ResumeContainer, RemoveContainer
            ("start unknown", lambda: agent.start_container("nope"), NOT_FOUND, "'nope'"),
            ("start twice", lambda: agent.start_container("live"), PRECONDITION, "running"),
            ("pause created", lambda: agent.pause_container("fresh"), PRECONDITION, "created"),
            ("resume running", lambda: agent.resume_container("live"), PRECONDITION,
             "running"),
            ("remove running", lambda: agent.remove_container("live"), PRECONDITION,
             "still runs"),
            ("remove unknown", lambda: agent.remove_container("nope"), NOT_FOUND, "'nope'"),
            ("start without a program", lambda: agent.start_container("noprog"),
             PRECONDITION, "No such file"),
            ("start again after that", lambda: agent.start_container("noprog"),
             PRECONDITION, "stopped"),
            # ExecProcess
            ("exec unknown container", exec_("nope", "e", proc), NOT_FOUND, "'nope'"),
            ("exec not started", exec_("fresh", "e", proc), PRECONDITION, "created"),
            ("exec id empty", exec_("live", "", proc), INVALID, "exec id ''"),
            ("exec id ..", exec_("live", "../../../x", proc), INVALID, "exec id"),
            ("exec id NUL", exec_("live", "e\0", proc), INVALID, "exec id"),
            ("exec id too long", exec_("live", "e" * 300, proc), INVALID, "exec id"),
            ("exec not JSON", exec_("live", "e", b"{"), INVALID, "process"),
            ("exec empty", exec_("live", "e", b""), INVALID, "process"),
            ("exec a list", exec_("live", "e", b"[]"), INVALID, "process: must be an object"),
            ("exec args missing", exec_("live", "e", b'{"cwd": "/"}'), INVALID,
             "process.args"),
            ("exec uid huge", exec_("live", "e", json.dumps(
                {**process, "user": {"uid": 2**64}}).encode()), INVALID, "process.user.uid"),
            ("exec cwd missing", exec_("live", "e", json.dumps(
                {**process, "cwd": "/no/such/dir"}).encode()), PRECONDITION, "/no/such/dir"),
            ("exec no program", exec_("live", "e", json.dumps(
                {**process, "args": ["/bin/no-such-program"]}).encode()), PRECONDITION,
             "No such file"),
            # SignalProcess
            ("signal unknown container", lambda: agent.signal_process("nope", "", 9),
             NOT_FOUND, "'nope'"),
            ("signal unknown exec", lambda: agent.signal_process("live", "nope", 9), NOT_FOUND,
             "'nope'"),
            ("signal 0", lambda: agent.signal_process("live", "", 0), INVALID, "signal 0"),
            ("signal 65", lambda: agent.signal_process("live", "", 65), INVALID, "signal 65"),
            ("signal huge", lambda: agent.signal_process("live", "", 2**32 - 1), INVALID,
             "signal 4294967295"),
            # WaitProcess, CloseStdin, TtyWinResize, Stdio
            ("wait unknown", lambda: agent.wait_process("nope", timeout_s=10), NOT_FOUND,
             "'nope'"),
            ("wait unknown exec", lambda: agent.wait_process("live", "nope", timeout_s=10),
             NOT_FOUND, "'nope'"),
            ("wait deadline", lambda: agent.wait_process("live", timeout_s=1),
             "DEADLINE_EXCEEDED", ""),
            ("close stdin unknown", lambda: agent.close_stdin("nope"), NOT_FOUND, "'nope'"),
            ("resize no terminal", lambda: agent.resize_tty("live", "", 24, 80), PRECONDITION,
             "has no terminal"),
            ("resize huge", lambda: agent.resize_tty("live", "", 70000, 80), INVALID,
             "height 70000"),
            ("resize unknown", lambda: agent.resize_tty("nope", "", 24, 80), NOT_FOUND,
             "'nope'"),
            ("stdio unknown", lambda: _chunks_of(agent, "nope"), NOT_FOUND, "'nope'"),
            # UpdateContainer
            ("update unknown", lambda: agent.update_container("nope", b"{}"), NOT_FOUND,
             "'nope'"),
            ("update not JSON", lambda: agent.update_container("live", b"{"), INVALID, ""),
            ("update empty", lambda: agent.update_container("live", b""), INVALID, ""),
            ("update a list", lambda: agent.update_container("live", b"[]"), INVALID,
             "resources: must be an object"),
            ("update wrong type", lambda: agent.update_container(
                "live", b'{"memory": {"limit": "1G"}}'), INVALID, "resources.memory.limit"),
            ("update huge", lambda: agent.update_container(
                "live", json.dumps({"memory": {"limit": 2**70}}).encode()), INVALID,
             "resources.memory.limit"),
            ("update cpuset", lambda: agent.update_container(
                "live", b'{"cpu": {"cpus": "99"}}'), INVALID, "cpuset.cpus"),
            ("update no cgroup kind", lambda: agent.update_container(
                "live", b'{"pids": {"limit": -2}}'), INVALID, "resources.pids.limit"),
            # CopyFile
            ("copy relative", lambda: agent.copy_file("run/hyperstart/f", b"x"), INVALID,
             "under /run/hyperstart"),
            ("copy ..", lambda: agent.copy_file("/run/hyperstart/../../etc/passwd", b"x"),
             INVALID, "under /run/hyperstart"),
            ("copy outside", lambda: agent.copy_file("/etc/passwd", b"x"), INVALID,
             "under /run/hyperstart"),
            ("copy the root", lambda: agent.copy_file("/run/hyperstart", b"x"), INVALID,
             "under /run/hyperstart"),
            ("copy NUL", lambda: agent.copy_file("/run/hyperstart/f\0g", b"x"), INVALID,
             "under /run/hyperstart"),
            ("copy name too long", lambda: agent.copy_file("/run/hyperstart/" + "f" * 300,
                                                           b"x"), INVALID, "name too long"),
            ("copy onto a directory", lambda: agent.copy_file("/run/hyperstart/containers",
                                                              b"x"), INVALID, "directory"),
            ("copy mode", lambda: agent.copy_file("/run/hyperstart/f", b"x", mode=0o170000),
             INVALID, "mode"),
            ("copy too big", lambda: _copy_raw(agent, size=2**40), INVALID, "over the"),
            ("copy short", lambda: _copy_raw(agent, size=10, data=b"x"), INVALID,
             "1 bytes arrived, 10 announced"),
            ("copy long", lambda: _copy_raw(agent, size=1, data=b"xy"), INVALID,
             "more than the announced 1 bytes"),
            # Network
            ("interface unknown MAC", lambda: agent.update_interface(
                Interface(hw_addr="02:00:00:00:00:99")), NOT_FOUND, "interface.hw_addr"),
            ("interface nothing to find it by", lambda: agent.update_interface(Interface()),
             INVALID, "interface: needs hw_addr or name"),
            ("interface bad name", lambda: agent.update_interface(Interface(name="a/b")),
             INVALID, "interface.name"),
            ("interface bad address", lambda: agent.update_interface(Interface(
                name="lo", ip_addresses=(IPAddress("127.0.0.1/8", 8),))), INVALID,
             "interface.ip_addresses[0].address"),
            ("interface prefix 0", lambda: agent.update_interface(Interface(
                name="lo", ip_addresses=(IPAddress("127.0.0.1"),))), INVALID,
             "interface.ip_addresses[0].prefix_len: 0"),
            ("interface mtu", lambda: agent.update_interface(Interface(name="lo", mtu=10)),
             INVALID, "interface.mtu: 10"),
            ("route bad dest", lambda: agent.update_routes((Route("300.0.0.0/8",
                                                                  device="lo"),)),
             INVALID, "routes[0].dest"),
            ("route bad gateway", lambda: agent.update_routes((Route(gateway="10.0.0.x"),)),
             INVALID, "routes[0].gateway"),
            ("route unknown device", lambda: agent.update_routes((Route("10.0.0.0/8",
                                                                        device="eth9"),)),
             NOT_FOUND, "routes[0].device"),
            ("neighbor bad ip", lambda: agent.add_arp_neighbors((
                _neighbor("10.0.0.256"),)), INVALID, "neighbors[0].to_ip.address"),
        ]
        failures = []
        for label, call, code, text in cases:
            problem = await _expect(call, code, text)
            if problem is not None:
                failures.append(f"{label}: {problem}")
            if not await agent.check():
                failures.append(f"{label}: the agent stopped answering Check")
                break
        assert not failures, "\n".join(failures)

        # Nothing was left behind: the ids used by failed calls work, and so does everything
        # else.
        await agent.create_container("x", _spec(rootfs, ["sh", "-c", "echo ok"]))
        out = asyncio.create_task(_collect(agent.stdio("x")))
        await agent.start_container("x")
        assert await agent.wait_process("x", timeout_s=60) == 0
        assert (await out)["stdout"] == b"ok\n"
        await agent.exec_process("live", "e", proc, stdio=False)
        assert await agent.wait_process("live", "e", timeout_s=60) == 0
        await agent.copy_file("/run/hyperstart/f", b"x")
        await agent.signal_process("live", "", signal.SIGKILL)
        assert await agent.wait_process("live", timeout_s=60) == 137
        for cid in ("x", "fresh", "noprog", "live"):
            await agent.remove_container(cid, force=True)

    async def main() -> None:
        shares = (Share("rootfs0", busybox_rootfs, readonly=True),)
        async with await GuestVm.boot(runtime_config, shares=shares) as sandbox:
            assert sandbox.agent is not None
            await body(sandbox.agent)

    asyncio.run(main())


def _neighbor(ip: str) -> ARPNeighbor:
    return ARPNeighbor(ip, "lo", "02:00:00:00:00:01")


async def _copy_raw(agent: AgentClient, *, size: int, data: bytes = b"") -> None:
    """A CopyFile stream whose announced size does not match its data (the client cannot
    send one)."""

    async def chunks() -> Any:
        yield pb.CopyFileChunk(path="/run/hyperstart/raw", mode=0o644, size=size, data=data)

    stub: Any = agent._stub
    await agent._call("CopyFile", stub.CopyFile(chunks(), timeout=30))
