"""Containers in a real guest over the agent channel, rootfs shared from the host by 9p."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Event, Output, Storage
from runv_py.devices import Share
from runv_py.errors import AgentError
from runv_py.sandbox import guest_spec
from runv_py.sandbox.guest_vm import GuestVm

MOUNT = "/run/hyperstart/storage/{}"


def _spec(root: str, args: list[str]) -> bytes:
    return json.dumps({
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": root, "readonly": True},
        "hostname": "guestbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }).encode()


async def _create(agent: AgentClient, cid: str, args: list[str]) -> None:
    mount = MOUNT.format(cid)
    await agent.create_container(cid, _spec(mount, args),
                                 storages=(Storage("9p", "rootfs0", mount),))


async def _collect(stream: AsyncIterator[Output]) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    async for chunk in stream:
        out[chunk.stream] += chunk.data
    return out


def _run(cfg: config.RuntimeConfig, rootfs: Path, body: Any) -> None:
    async def main() -> None:
        shares = (Share("rootfs0", rootfs, readonly=True),)
        async with await GuestVm.boot(cfg, shares=shares) as sandbox:
            assert sandbox.agent is not None
            await body(sandbox.agent)

    asyncio.run(main())


def test_run_a_container_output_and_exit_code(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        await _create(agent, "c1", ["sh", "-c", "echo hello; hostname; echo pid=$$; "
                                                "echo oops >&2; exit 3"])
        output = asyncio.create_task(_collect(agent.stdio("c1")))
        await agent.start_container("c1")
        assert await agent.wait_process("c1", timeout_s=60) == 3
        out = await output
        assert out["stdout"] == b"hello\nguestbox\npid=1\n" and out["stderr"] == b"oops\n"
        await agent.remove_container("c1")
        assert await agent.check()

    _run(runtime_config, busybox_rootfs, body)


def test_stdin_exec_and_signals(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        await _create(agent, "c2", ["sh", "-c", "read line; echo got:$line; exec sleep 600"])

        async def stdin() -> AsyncIterator[bytes]:
            yield b"ping\n"

        output = asyncio.create_task(_collect(agent.stdio("c2", stdin=stdin())))
        await agent.start_container("c2")
        process = json.dumps({"args": ["sh", "-c", "echo pid=$$; hostname"],
                              "env": ["PATH=/bin"], "cwd": "/"}).encode()
        await agent.exec_process("c2", "e1", process)
        exec_output = asyncio.create_task(_collect(agent.stdio("c2", "e1")))
        assert await agent.wait_process("c2", "e1", timeout_s=60) == 0
        lines = (await exec_output)["stdout"].decode().split()
        assert lines[0].startswith("pid=") and lines[0] != "pid=1" and lines[1] == "guestbox"
        await agent.signal_process("c2", "", signal.SIGKILL)
        assert await agent.wait_process("c2", timeout_s=60) == 128 + signal.SIGKILL
        assert (await output)["stdout"] == b"got:ping\n"
        await agent.remove_container("c2")

    _run(runtime_config, busybox_rootfs, body)


def test_bad_requests_name_the_field_and_the_agent_keeps_serving(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        bad = json.loads(_spec(MOUNT.format("z"), ["true"]))
        bad["linux"]["resources"] = {"cpu": {"cpus": "99"}}
        bad_cpuset = json.dumps(bad).encode()
        cases = [
            (lambda: agent.create_container("x", b"{not json"), "INVALID_ARGUMENT", "JSON"),
            (lambda: agent.create_container("x", b'{"root": {"path": "/"}}'),
             "INVALID_ARGUMENT", "process: is required"),
            (lambda: _create(agent, "x", []), "INVALID_ARGUMENT", "process.args"),
            (lambda: agent.start_container("nope"), "NOT_FOUND", "nope"),
            (lambda: agent.wait_process("nope", timeout_s=5), "NOT_FOUND", "nope"),
            (lambda: agent.create_container("y", _spec("/r", ["true"]), storages=(
                Storage("9p", "no-such-tag", "/run/hyperstart/storage/y"),)),
             "INVALID_ARGUMENT", "no-such-tag"),
            (lambda: agent.create_container("z", bad_cpuset, storages=(
                Storage("9p", "rootfs0", MOUNT.format("z")),)),
             "FAILED_PRECONDITION", "cgroup: cpuset.cpus = '99'"),
        ]
        for call, code, text in cases:
            with pytest.raises(AgentError) as info:
                await call()
            assert code in str(info.value) and text in str(info.value)
            assert await agent.check()
        # The failed creates left nothing behind (the 9p tag mounts again, so z's storage was
        # unmounted), and the same ids work now.
        await _create(agent, "x", ["true"])
        await agent.start_container("x")
        assert await agent.wait_process("x", timeout_s=60) == 0
        await agent.remove_container("x")

    _run(runtime_config, busybox_rootfs, body)


def test_terminal_with_size_and_resize(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        spec = json.loads(_spec(MOUNT.format("t1"), ["sh", "-c", "tty; stty size; read x; "
                                                                 "stty size"]))
        spec["process"].update(terminal=True, consoleSize={"height": 30, "width": 100})
        spec["mounts"].append({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                               "options": ["newinstance", "ptmxmode=0666", "mode=0620"]})
        await agent.create_container("t1", json.dumps(spec).encode(), storages=(
            Storage("9p", "rootfs0", MOUNT.format("t1")),))
        resized = asyncio.Event()

        async def stdin() -> AsyncIterator[bytes]:
            await resized.wait()
            yield b"\n"

        chunks: list[Output] = []

        async def read() -> None:
            async for chunk in agent.stdio("t1", stdin=stdin()):
                chunks.append(chunk)
                text = b"".join(c.data for c in chunks)
                if b"30 100" in text and not resized.is_set():
                    await agent.resize_tty("t1", "", 50, 132)
                    resized.set()

        reader = asyncio.create_task(read())
        await agent.start_container("t1")
        assert await agent.wait_process("t1", timeout_s=60) == 0
        await reader
        lines = [line.strip() for line in
                 b"".join(c.data for c in chunks).decode().splitlines() if line.strip()]
        assert lines[0] == "/dev/pts/0" and lines[1] == "30 100" and lines[-1] == "50 132"
        assert all(c.stream == "stdout" for c in chunks)
        await agent.remove_container("t1")

    _run(runtime_config, busybox_rootfs, body)


def test_large_output_is_delivered_whole_before_the_exit_status(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        # 64 MiB through stdout (and a marker on stderr), then exit 5 at once.
        await _create(agent, "big", ["sh", "-c", "head -c 67108864 /dev/zero; "
                                                 "echo done >&2; exit 5"])
        sizes = {"stdout": 0, "stderr": 0}
        eofs = []

        async def read() -> None:
            async for chunk in agent.stdio("big"):
                sizes[chunk.stream] += len(chunk.data)
                if chunk.eof:
                    eofs.append(chunk.stream)

        reader = asyncio.create_task(read())
        await agent.start_container("big")
        code = await agent.wait_process("big", timeout_s=600)
        assert reader.done() or sizes["stdout"] == 64 * 1024 * 1024  # drained before exit
        await reader
        assert code == 5 and sizes == {"stdout": 64 * 1024 * 1024, "stderr": 5}
        assert sorted(eofs) == ["stderr", "stdout"]
        await agent.remove_container("big")

    _run(runtime_config, busybox_rootfs, body)


def test_cgroup_limits_pause_resume_update_stats_and_oom(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        spec = json.loads(_spec(MOUNT.format("cg"), [
            "sh", "-c", "cat /proc/self/cgroup /sys/fs/cgroup/memory.max "
                        "/sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max; "
                        "grep -o ' cgroup2 .*' /proc/self/mountinfo; exec sleep 600"]))
        spec["linux"]["namespaces"].append({"type": "cgroup"})
        spec["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup2",
                               "source": "cgroup"})
        spec["linux"]["resources"] = {"memory": {"limit": 64 << 20},
                                      "pids": {"limit": 20},
                                      "cpu": {"quota": 50000, "period": 100000}}
        await agent.create_container("cg", json.dumps(spec).encode(), storages=(
            Storage("9p", "rootfs0", MOUNT.format("cg")),))
        output = asyncio.create_task(_collect(agent.stdio("cg")))
        await agent.start_container("cg")
        for _ in range(100):
            if [a for _, a in await agent.list_processes("cg") if a[:1] == ("sleep",)]:
                break
            await asyncio.sleep(0.1)
        assert [args for _, args in await agent.list_processes("cg")] == [("sleep", "600")]
        stats = await agent.stats_container("cg")
        assert stats["memory.max"] == 64 << 20 and stats["pids.max"] == 20
        assert stats["pids.current"] == 1 and stats["memory.current"] > 0

        await agent.pause_container("cg")
        noop = json.dumps({"args": ["true"], "env": ["PATH=/bin"], "cwd": "/"}).encode()
        with pytest.raises(AgentError, match=r"FAILED_PRECONDITION.*paused"):
            await agent.exec_process("cg", "e1", noop)
        await agent.resume_container("cg")
        await agent.exec_process("cg", "e2", noop)
        assert await agent.wait_process("cg", "e2", timeout_s=60) == 0

        await agent.update_container("cg", json.dumps({"pids": {"limit": 30}}).encode())
        assert (await agent.stats_container("cg"))["pids.max"] == 30
        with pytest.raises(AgentError, match=r"INVALID_ARGUMENT.*resources\.pids\.limit"):
            await agent.update_container("cg", b'{"pids": {"limit": "x"}}')

        await agent.signal_process("cg", "", signal.SIGKILL)
        assert await agent.wait_process("cg", timeout_s=60) == 137
        lines = (await output)["stdout"].decode().split("\n")
        assert lines[:4] == ["0::/", str(64 << 20), "20", "50000 100000"]
        # The guest's hierarchy places processes without waiting for RCU (cgroups.py).
        assert "favordynmods" in lines[4].split()[-1].split(","), lines[4]
        await agent.remove_container("cg")

        # A process over its container's memory limit is OOM-killed: an OOM event while the
        # container's init still runs (the engine's watcher of memory.events), the kill in its
        # stats; its exit event after.
        events: list[Event] = []
        oom_seen = asyncio.Event()

        async def watch() -> None:
            async for event in agent.events():
                # (the audit's "process" records of the container's execs come too)
                if event.container_id == "oom" and event.kind != "process":
                    events.append(event)
                    oom_seen.set()
                    if event.kind == "exit":
                        return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)  # the stream is open
        spec = json.loads(_spec(MOUNT.format("oom"), [
            "sh", "-c", "head -c 200000000 /dev/zero | tail; exec sleep 600"]))
        spec["linux"]["resources"] = {"memory": {"limit": 32 << 20, "swap": 32 << 20}}
        await agent.create_container("oom", json.dumps(spec).encode(), stdio=False, storages=(
            Storage("9p", "rootfs0", MOUNT.format("oom")),))
        await agent.start_container("oom")
        await asyncio.wait_for(oom_seen.wait(), 120)
        assert events == [Event("oom", "oom")]  # and no exit: sleep runs
        assert (await agent.stats_container("oom"))["memory.oom_kill"] >= 1
        await agent.signal_process("oom", "", signal.SIGKILL)
        assert await agent.wait_process("oom", timeout_s=60) == 137
        await asyncio.wait_for(watcher, 30)
        assert events[-1].kind == "exit" and events[-1].exit_code == 137
        await agent.remove_container("oom")

    _run(runtime_config, busybox_rootfs, body)


def test_pod_sandbox_shared_namespaces_clock_and_entropy(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        paths = await agent.create_sandbox(
            "pod1", hostname="podhost", dns=("nameserver 192.0.2.53",),
            sysctls={"net.ipv4.ip_forward": "1"}, shared_namespaces=("network", "ipc", "uts"))
        assert sorted(paths) == ["ipc", "network", "uts"]
        await agent.set_guest_time(1893456000)  # 2030-01-01
        await agent.reseed_random(bytes(range(64)))
        assert await agent.online_cpu_mem() == (0, 0)  # nothing was hot-plugged
        outputs = {}
        for cid in ("a", "b"):
            # One 9p device mounts once: b uses the root that a's storage brought.
            spec = json.loads(_spec(MOUNT.format("a"), [
                "sh", "-c", "hostname; for n in net uts ipc; do readlink /proc/self/ns/$n; "
                            "done; date +%Y"]))
            spec["linux"]["namespaces"] = [
                {"type": "pid"}, {"type": "mount"},
                *({"type": kind, "path": path} for kind, path in paths.items())]
            await agent.create_container(cid, json.dumps(spec).encode(), storages=(
                Storage("9p", "rootfs0", MOUNT.format(cid)),) if cid == "a" else ())
            output = asyncio.create_task(_collect(agent.stdio(cid)))
            await agent.start_container(cid)
            assert await agent.wait_process(cid, timeout_s=60) == 0
            outputs[cid] = (await output)["stdout"].decode().split()
        a, b = outputs["a"], outputs["b"]
        assert len(a) == len(b) == 5, outputs
        assert a[0] == b[0] == "podhost"
        assert a[1:4] == b[1:4]  # net, uts, ipc: the sandbox's, kept while no container runs
        assert a[4] == "2030"
        with pytest.raises(AgentError, match="INVALID_ARGUMENT"):
            await agent.reseed_random(b"")
        with pytest.raises(AgentError, match=r"INVALID_ARGUMENT.*'pid' is not one of"):
            await agent.create_sandbox("pod2", shared_namespaces=("pid",))
        await agent.destroy_sandbox()  # removes the containers and the namespaces
        with pytest.raises(AgentError, match="NOT_FOUND"):
            await agent.start_container("a")
        assert await agent.check()

    _run(runtime_config, busybox_rootfs, body)


def test_copy_file_into_the_guest_and_run_it_in_a_container(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        script = b"#!/bin/sh\necho copied $(id -u)\n" + b"# padding\n" * 300_000
        await agent.copy_file("/run/hyperstart/files/hello.sh", script, mode=0o755)
        spec = json.loads(_spec(MOUNT.format("cp"), ["/work/hello.sh"]))
        spec["mounts"].append({"destination": "/work", "type": "bind",
                               "source": "/run/hyperstart/files", "options": ["bind", "ro"]})
        await agent.create_container("cp", json.dumps(spec).encode(), storages=(
            Storage("9p", "rootfs0", MOUNT.format("cp")),))
        output = asyncio.create_task(_collect(agent.stdio("cp")))
        await agent.start_container("cp")
        assert await agent.wait_process("cp", timeout_s=60) == 0
        assert (await output)["stdout"] == b"copied 0\n"
        await agent.remove_container("cp")
        with pytest.raises(AgentError, match=r"INVALID_ARGUMENT.*under /run/hyperstart"):
            await agent.copy_file("/etc/evil", b"x")

    _run(runtime_config, busybox_rootfs, body)


def test_seccomp_in_the_guest_also_for_exec(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        spec = json.loads(_spec(MOUNT.format("sc"), [
            "sh", "-c", "mkdir /dev/d 2>&1; grep Seccomp: /proc/self/status; exec sleep 600"]))
        spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
        await agent.create_container("sc", json.dumps(spec).encode(), storages=(
            Storage("9p", "rootfs0", MOUNT.format("sc")),))
        output = asyncio.create_task(_collect(agent.stdio("sc")))
        await agent.start_container("sc")
        process = json.dumps({"args": ["sh", "-c", "mkdir /dev/e 2>&1; echo exec-done"],
                              "env": ["PATH=/bin"], "cwd": "/"}).encode()
        await agent.exec_process("sc", "e", process)
        exec_output = asyncio.create_task(_collect(agent.stdio("sc", "e")))
        assert await agent.wait_process("sc", "e", timeout_s=60) == 0
        assert b"Operation not permitted" in (await exec_output)["stdout"]
        await agent.signal_process("sc", "", signal.SIGKILL)
        await agent.wait_process("sc", timeout_s=60)
        out = (await output)["stdout"].decode()
        assert "Operation not permitted" in out and "Seccomp:\t2" in out
        await agent.remove_container("sc")

    _run(runtime_config, busybox_rootfs, body)


def test_pod_container_joins_another_containers_pid_namespace(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    async def body(agent: AgentClient) -> None:
        # The first container's init is "sleep 600"; the agent keeps its pid namespace where
        # the host names it for a pod's other containers (guest_spec.pid_namespace).
        await _create(agent, "first", ["sleep", "600"])
        await agent.start_container("first")
        [(_, args)] = await agent.list_processes("first")
        assert args == ("sleep", "600")
        spec = json.loads(_spec(MOUNT.format("first"), [
            "sh", "-c", "ps -o pid,args; readlink /proc/self/ns/pid"]))
        spec["linux"]["namespaces"] = [
            {"type": "pid", "path": guest_spec.pid_namespace("first")},
            {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]
        await agent.create_container("second", json.dumps(spec).encode())
        output = asyncio.create_task(_collect(agent.stdio("second")))
        await agent.start_container("second")
        assert await agent.wait_process("second", timeout_s=60) == 0
        lines = (await output)["stdout"].decode().splitlines()
        # The second sees the first's init as pid 1 and itself in the same namespace.
        assert lines[0].split() == ["PID", "COMMAND"]
        assert lines[1].split() == ["1", "sleep", "600"], lines
        assert lines[2].split()[:3] == ["2", "sh", "-c"], lines
        process = json.dumps({"args": ["readlink", "/proc/self/ns/pid"], "env": ["PATH=/bin"],
                              "cwd": "/"}).encode()
        await agent.exec_process("first", "ns", process)
        exec_output = asyncio.create_task(_collect(agent.stdio("first", "ns")))
        assert await agent.wait_process("first", "ns", timeout_s=60) == 0
        assert (await exec_output)["stdout"].decode().strip() == lines[-1]
        await agent.remove_container("second")
        # In a pid namespace it did not make, a container's init leaves orphans behind when
        # it dies (the namespace's PID 1 adopts them): they are killed with it, as runc's
        # shim does, or they would hold its output open and its exit would never be reported.
        spec["process"]["args"] = ["sh", "-c", "sleep 601 & exec sleep 602"]

        async def started(cid: str) -> asyncio.Task[dict[str, bytes]]:
            await agent.create_container(cid, json.dumps(spec).encode())
            output = asyncio.create_task(_collect(agent.stdio(cid)))
            await agent.start_container(cid)
            want = [("sleep", "601"), ("sleep", "602")]  # once the shell has exec'd
            for _ in range(100):
                if sorted(a for _, a in await agent.list_processes(cid)) == want:
                    break
                await asyncio.sleep(0.1)
            assert sorted(a for _, a in await agent.list_processes(cid)) == want
            return output

        output = await started("third")
        await agent.signal_process("third", "", signal.SIGKILL)  # the init only
        assert await agent.wait_process("third", timeout_s=60) == 137
        await output
        assert await agent.list_processes("third") == []
        await agent.remove_container("third")
        # Signalling all of a container reaches what its init started (runc's kill --all).
        output = await started("third")
        await agent.signal_process("third", "", signal.SIGTERM, all_processes=True)
        assert await agent.wait_process("third", timeout_s=60) == 143
        await output
        await agent.remove_container("third")
        await agent.remove_container("first", force=True)
        # Gone with its container: nothing can join it any more.
        spec["root"]["path"] = MOUNT.format("fourth")
        with pytest.raises(AgentError, match=r"FAILED_PRECONDITION.*first/ns/pid"):
            await agent.create_container("fourth", json.dumps(spec).encode(), storages=(
                Storage("9p", "rootfs0", MOUNT.format("fourth")),))
        assert await agent.check()

    _run(runtime_config, busybox_rootfs, body)


def test_force_remove_while_streaming_keeps_the_agent_serving(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    """Force-removing a container whose output (and stdin) is being streamed ends that stream,
    and the same sandbox goes on serving: the agent must not close the process's pipes under
    the thread reading them (its fd numbers would be reused by whatever opens next)."""

    async def body(agent: AgentClient) -> None:
        for round_ in range(3):
            cid = f"flood{round_}"
            await _create(agent, cid, ["yes", "tick-tick-tick"])
            stdin_open = asyncio.Event()

            async def stdin(until: asyncio.Event) -> AsyncIterator[bytes]:
                yield b"x\n"
                await until.wait()

            stream = agent.stdio(cid, stdin=stdin(stdin_open))
            await agent.start_container(cid)
            received = 0
            async for chunk in stream:
                received += len(chunk.data)
                if received > 64 * 1024:
                    break
            # Stall the stream until flow control holds the agent's reader mid-stream; the
            # container goes and the next one opens its pipes; only then is the old stream
            # read to its end.
            await asyncio.sleep(4)
            await agent.remove_container(cid, force=True)
            await _create(agent, f"after{round_}", ["sh", "-c", "sleep 1; echo still-here; "
                                                                "exit 7"])
            output = asyncio.create_task(_collect(agent.stdio(f"after{round_}")))
            await agent.start_container(f"after{round_}")
            stdin_open.set()
            async for _ in stream:  # to its end, without an error
                pass
            assert await agent.check()
            assert await agent.wait_process(f"after{round_}", timeout_s=60) == 7
            assert (await asyncio.wait_for(output, 60))["stdout"] == b"still-here\n"
            await agent.remove_container(f"after{round_}")

    _run(runtime_config, busybox_rootfs, body)


def test_an_idle_guest_kernel_runs_no_housekeeping_timers(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:
    """kcompactd does not wake while the guest idles, and vmstat folds every 10 s: each
    wake-up of an idle sandbox's guest is CPU its host spends (emulated under TCG). The
    container shares the VM's pid namespace to see the kernel's threads."""
    script = ("for p in /proc/[0-9]*; do read c < $p/comm; "
              "[ \"$c\" = kcompactd0 ] && k=$p; done; "
              "cat $k/status > /dev/a; sleep 4; cat $k/status > /dev/b; "
              "cat /proc/sys/vm/compaction_proactiveness /proc/sys/vm/stat_interval; "
              "echo ---; cat /dev/a; echo ---; cat /dev/b")

    async def body(agent: AgentClient) -> None:
        spec = json.loads(_spec(MOUNT.format("idle"), ["sh", "-c", script]))
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                       if n["type"] != "pid"]
        await agent.create_container("idle", json.dumps(spec).encode(),
                                     storages=(Storage("9p", "rootfs0", MOUNT.format("idle")),))
        output = asyncio.create_task(_collect(agent.stdio("idle")))
        await agent.start_container("idle")
        assert await agent.wait_process("idle", timeout_s=60) == 0
        settings, before, after = (await output)["stdout"].decode().split("---\n")

        def switches(status: str) -> int:
            return sum(int(line.split()[1]) for line in status.splitlines()
                       if "ctxt_switches" in line)

        assert switches(after) == switches(before), "kcompactd woke while the guest idled"
        assert settings.split() == ["0", "10"]
        await agent.remove_container("idle")

    _run(runtime_config, busybox_rootfs, body)
