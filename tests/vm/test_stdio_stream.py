"""Process stdio over a vsock stream of its own (StdioStream, or ExecProcess with a token; the
vsock channel): who may connect to the agent's stream listener, and what a wrong token gets;
the serial channel keeps the Stdio RPC."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from runv_py import config
from runv_py.agent._pb import hyperstart_pb2 as pb
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Storage
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm

MOUNT = "/run/hyperstart/storage/{}"

# In a container: connect to the stream listener (and the agent's channel) from every CID a
# guest process can name, send a token of zeros, report what came back; then try to take the
# stream port.
PROBE = r'''
import json, socket, sys
port = int(sys.argv[1])
seen = {}
for cid, port in [(cid, p) for cid in (socket.VMADDR_CID_ANY, 1, 2, 3) for p in (port, 1024)]:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((cid, port))
        s.sendall(bytes(32) + b"injected\n")
        data = s.recv(100)
        seen[f"{cid}:{port}"] = f"received {data!r}" if data else "closed"
    except OSError as exc:
        seen[f"{cid}:{port}"] = type(exc).__name__
    s.close()
port = int(sys.argv[1])
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
try:
    s.bind((socket.VMADDR_CID_ANY, port))
    s.listen(1)
    seen["bind"] = "bound"
except OSError as exc:
    seen["bind"] = type(exc).__name__
print(json.dumps(seen))
'''


def _spec(root: str, args: list[str], guest_python: bool = False) -> bytes:
    spec: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/bin:/usr/bin"], "cwd": "/"},
        "root": {"path": root, "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }
    if guest_python:  # the guest's own python3, and the files the host copied in
        spec["mounts"] += [
            {"destination": "/work", "type": "bind", "source": "/run/hyperstart/files",
             "options": ["rbind", "ro"]},
            *({"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]}
              for d in ("/usr", "/lib", "/lib64"))]
    return json.dumps(spec).encode()


def test_containers_cannot_reach_the_stream_listener_or_agent_and_a_wrong_token_gets_nothing(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, rootfs, symlinks=True)
    for d in ("usr", "lib", "lib64"):
        (rootfs / d).mkdir()

    async def main() -> None:
        async with await GuestVm.boot(runtime_config,
                                      shares=(Share("r", rootfs, readonly=True),)) as sandbox:
            agent = sandbox.agent
            assert isinstance(agent, AgentClient) and agent.dial is not None
            storage = (Storage("9p", "r", MOUNT.format("s")),)
            # A process whose output waits for its stream: registered, not yet connected.
            await agent.create_container("victim", _spec(MOUNT.format("s"), [
                "sh", "-c", "echo real-output; echo real-error >&2; exit 6"]), storages=storage)
            token = secrets.token_bytes(32)
            port = (await agent._stub.StdioStream(pb.StdioStreamRequest(
                container_id="victim", token=token))).port
            await agent.start_container("victim")

            await agent.copy_file("/run/hyperstart/files/probe.py", PROBE.encode())
            await agent.create_container("prober", _spec(
                MOUNT.format("s"), ["python3", "/work/probe.py", str(port)], guest_python=True))
            stream = agent.stdio("prober")
            await agent.start_container("prober")
            probe = [chunk async for chunk in stream]
            assert await agent.wait_process("prober", timeout_s=120) == 0
            seen = json.loads(b"".join(c.data for c in probe if c.stream == "stdout"))
            assert seen.pop("bind") == "OSError", seen  # EADDRINUSE: the agent holds it
            # No container connection gets a byte: refused, reset, or closed at once (the
            # agent's channel on 1024 too: gRPC would answer its preface otherwise).
            assert not any(what.startswith("received") for what in seen.values()), seen

            # The host with a wrong token: closed, nothing read; the right one still works.
            reader, writer = await agent.dial(port)
            writer.write(secrets.token_bytes(32))
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            output = {"stdout": b"", "stderr": b""}
            async for chunk in agent._stdio_stream(port, token, None):
                output[chunk.stream] += chunk.data
            assert output == {"stdout": b"real-output\n", "stderr": b"real-error\n"}
            assert await agent.wait_process("victim", timeout_s=60) == 6
            # The token was good for one connection.
            reader, writer = await agent.dial(port)
            writer.write(token)
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()

            # An exec registers its process's stream in ExecProcess itself (no StdioStream
            # call); a token of the wrong size there is refused before anything runs.
            await agent.create_container("runner", _spec(MOUNT.format("s"), ["sleep", "600"]))
            await agent.start_container("runner")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent._stub.ExecProcess(pb.ExecProcessRequest(
                    container_id="runner", exec_id="short", stdio_token=bytes(5),
                    process_json=json.dumps({"args": ["sleep", "301"], "cwd": "/"}).encode()))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert not any("301" in argv for _, argv in await agent.list_processes("runner"))
            await agent.exec_process("runner", "e1", json.dumps({
                "args": ["sh", "-c", "echo exec-out; echo exec-err >&2; exit 4"],
                "env": ["PATH=/bin"], "cwd": "/"}).encode(), attach=True)
            exec_port, exec_token, _ = agent._registered[("runner", "e1")]
            output = {"stdout": b"", "stderr": b""}
            async for chunk in agent.stdio("runner", "e1"):
                output[chunk.stream] += chunk.data
            assert output == {"stdout": b"exec-out\n", "stderr": b"exec-err\n"}
            assert await agent.wait_process("runner", "e1", timeout_s=60) == 4
            assert ("runner", "e1") not in agent._registered
            reader, writer = await agent.dial(exec_port)  # used once: nothing more
            writer.write(exec_token)
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            await agent.remove_container("runner", force=True)
            for cid in ("victim", "prober"):
                await agent.remove_container(cid)

    asyncio.run(main())



def test_serial_channel_keeps_the_stdio_rpc(runtime_config: config.RuntimeConfig,
                                            busybox_rootfs: Path) -> None:
    cfg = replace(runtime_config, template="off",
                  guest=replace(runtime_config.guest, channel="serial"))

    async def main() -> None:
        async with await GuestVm.boot(cfg, shares=(Share("r", busybox_rootfs, readonly=True),)
                                      ) as sandbox:
            agent = sandbox.agent
            assert agent is not None and agent.dial is None
            # The agent has no stream listener without a vsock channel.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent._stub.StdioStream(pb.StdioStreamRequest(
                    container_id="c", token=bytes(32)))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await agent.create_container("c", _spec(MOUNT.format("c"), [
                "sh", "-c", "read x; echo out:$x; echo err >&2; exit 3"]),
                storages=(Storage("9p", "r", MOUNT.format("c")),))

            async def stdin() -> AsyncIterator[bytes]:
                yield b"over-serial\n"

            stream = agent.stdio("c", stdin=stdin())
            await agent.start_container("c")
            output = {"stdout": b"", "stderr": b""}
            async for chunk in stream:
                output[chunk.stream] += chunk.data
            assert output == {"stdout": b"out:over-serial\n", "stderr": b"err\n"}
            assert await agent.wait_process("c", timeout_s=60) == 3
            await agent.remove_container("c")

    asyncio.run(main())
