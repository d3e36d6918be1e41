"""`runv` through its CLI, as containerd's runc shim and podman drive it: the OCI lifecycle
and state rules (runtime-spec runtime.md), pid files and stand-ins, exit statuses, exec,
signals, and the host left clean."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from runv_py.sandbox.client import SupervisorClient
from runv_py.sandbox.protocol import State

from .conftest import Runv, reap


def test_run_foreground_output_and_exit_code(runv: Runv) -> None:
    bundle = runv.bundle(["sh", "-c", "echo out:$(hostname); echo err >&2; exit 7"])
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 7, result.stderr
    assert result.stdout == b"out:runvbox\n"
    assert b"err\n" in result.stderr
    assert not (runv.root / "c1").exists()


def test_create_start_state_delete_with_stand_in(runv: Runv, tmp_path: Path) -> None:
    bundle = runv.bundle(["sh", "-c", "read line; echo got:$line; exit 3"])
    pid_file = tmp_path / "init.pid"
    r_in, w_in = os.pipe()
    out = tmp_path / "out"
    with open(out, "wb") as out_f:
        runv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1",
             stdin=r_in, stdout=out_f)
    os.close(r_in)
    text = pid_file.read_text()
    assert text.isdigit(), f"pid file holds {text!r}"  # go-runc: Atoi, no newline
    pid = int(text)
    state = runv.state_of("c1")
    assert state["status"] == "created" and state["pid"] == pid
    assert state["bundle"] == str(bundle) and state["id"] == "c1"
    assert {"ociVersion", "created", "rootfs", "annotations"} <= set(state)
    os.kill(pid, 0)  # the stand-in lives

    # OCI: create again with the same id fails; start twice fails; delete a running one fails
    again = runv("create", "--bundle", str(bundle), "c1", check=False)
    assert again.returncode == 1 and b"already exists" in again.stderr
    runv("start", "c1")
    assert runv.state_of("c1")["status"] == "running"
    assert runv("start", "c1", check=False).returncode == 1
    busy = runv("delete", "c1", check=False)
    assert busy.returncode == 1 and b"not stopped" in busy.stderr

    os.write(w_in, b"hello\n")
    os.close(w_in)
    assert reap(pid) == 3  # the stand-in exits with the container's status
    assert out.read_bytes() == b"got:hello\n"
    runv.wait_status("c1", "stopped")
    assert runv.state_of("c1")["pid"] == 0
    assert runv("kill", "c1", "KILL", check=False).returncode == 1
    assert runv("start", "c1", check=False).returncode == 1
    runv("delete", "c1")
    missing = runv("state", "c1", check=False)
    assert missing.returncode == 1 and b"does not exist" in missing.stderr
    log = [json.loads(line) for line in (runv.top / "log.json").read_text().splitlines()]
    assert any(e["level"] == "error" and "does not exist" in e["msg"] for e in log)


def test_signals_reach_the_container(runv: Runv, tmp_path: Path) -> None:
    script = ("trap 'echo term; exit 42' TERM; echo ready; "
              "while :; do sleep 0.1; done")
    bundle = runv.bundle(["sh", "-c", script])
    pid_file = tmp_path / "init.pid"
    out = tmp_path / "out"
    with open(out, "wb") as out_f:
        runv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1",
             stdout=out_f)
    pid = int(pid_file.read_text())
    runv("start", "c1")
    _wait_for(lambda: out.read_bytes() == b"ready\n")
    os.kill(pid, signal.SIGTERM)  # a signal to the stand-in is forwarded into the VM
    assert reap(pid) == 42
    assert out.read_bytes() == b"ready\nterm\n"
    runv("delete", "c1")

    bundle = runv.bundle(["sleep", "600"])
    runv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c2")
    pid = int(pid_file.read_text())
    runv("start", "c2")
    runv("kill", "c2", "9")  # go-runc sends the number
    assert reap(pid) == 128 + 9
    runv("delete", "c2")


def test_exec_ps_pause_update_stats(runv: Runv, tmp_path: Path) -> None:
    bundle = runv.bundle(["sleep", "600"], edit=_with_limits)
    runv("run", "-d", "--bundle", str(bundle), "--pid-file", str(tmp_path / "init.pid"), "c1")
    init_pid = int((tmp_path / "init.pid").read_text())
    assert runv.state_of("c1")["status"] == "running"

    result = runv("exec", "c1", "sh", "-c", "echo in:$(hostname); exit 5", check=False)
    assert result.returncode == 5 and result.stdout == b"in:runvbox\n"
    # The VM is sized for the container: the configured 256 MiB plus its 128 MiB limit.
    meminfo = runv("exec", "c1", "head", "-n", "1", "/proc/meminfo").stdout.split()
    assert 300 * 1024 < int(meminfo[1]) <= 384 * 1024, meminfo

    process = {"args": ["sh", "-c", "cat; echo done"], "cwd": "/", "env": ["PATH=/bin"],
               "user": {"uid": 0, "gid": 0}}
    (tmp_path / "process.json").write_text(json.dumps(process))
    out = tmp_path / "exec.out"
    r_in, w_in = os.pipe()
    with open(out, "wb") as out_f:
        runv("exec", "--process", str(tmp_path / "process.json"), "--detach",
             "--pid-file", str(tmp_path / "exec.pid"), "c1", stdin=r_in, stdout=out_f)
    os.close(r_in)
    exec_pid = int((tmp_path / "exec.pid").read_text())
    os.write(w_in, b"data\n")
    os.close(w_in)
    assert reap(exec_pid) == 0
    assert out.read_bytes() == b"data\ndone\n"

    pids = json.loads(runv("ps", "--format", "json", "c1").stdout)
    assert len(pids) == 1 and all(isinstance(p, int) for p in pids)  # guest pids
    assert b"sleep 600" in runv("ps", "c1").stdout

    runv("pause", "c1")
    assert runv.state_of("c1")["status"] == "paused"
    assert runv("pause", "c1", check=False).returncode == 1
    ctl = runv.sandbox_dir("c1") / "ctl.sock"
    assert _vm_status(ctl) == "paused"  # one container: the VM stops too
    assert len(json.loads(runv("ps", "--format", "json", "c1").stdout)) == 1
    runv("resume", "c1")
    assert _vm_status(ctl) == "running"
    assert runv.state_of("c1")["status"] == "running"

    runv("update", "--resources", "-", "c1",
         input=json.dumps({"memory": {"limit": 64 << 20}, "pids": {"limit": 50}}).encode())
    stats = json.loads(runv("events", "--stats", "c1").stdout)
    assert stats["type"] == "stats" and stats["id"] == "c1"
    assert stats["data"]["memory"]["usage"]["limit"] == 64 << 20
    assert stats["data"]["pids"]["limit"] == 50
    assert stats["data"]["pids"]["current"] >= 1
    assert stats["data"]["cpu"]["usage"]["total"] > 0

    listed = json.loads(runv("list", "--format", "json").stdout)
    assert [c["id"] for c in listed] == ["c1"] and listed[0]["status"] == "running"
    # As runc's: SIGKILL ends a paused container (containerd's `task delete -f` sends it).
    runv("pause", "c1")
    runv("kill", "--all", "c1", "KILL")
    assert reap(init_pid) == 137
    assert runv.state_of("c1")["status"] == "stopped"
    runv("delete", "c1")


def _vm_status(ctl: Path) -> str:
    """The VM's run state as QEMU reports it to the supervisor (QMP takes one client)."""
    return asyncio.run(SupervisorClient(ctl).call(State(container="c1"))).vm


def _with_limits(spec: dict[str, Any]) -> None:
    spec["linux"]["resources"] = {"memory": {"limit": 128 << 20}, "pids": {"limit": 100}}


def _wait_for(predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_bad_bundles_fail_cleanly(runv: Runv, tmp_path: Path) -> None:
    def case(edit: Any) -> subprocess.CompletedProcess[bytes]:
        bundle = runv.bundle(["true"], edit=edit)
        return runv("create", "--bundle", str(bundle), "bad", check=False)

    def no_rootfs(spec: dict[str, Any]) -> None:
        spec["root"]["path"] = "missing"

    def wrong_type(spec: dict[str, Any]) -> None:
        spec["process"]["terminal"] = "yes"

    def bad_namespace(spec: dict[str, Any]) -> None:
        spec["linux"]["namespaces"].append({"type": "bogus"})

    def dotdot(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/a/../../etc", "type": "tmpfs",
                               "source": "tmpfs"})

    def missing_bind(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/data", "type": "bind",
                               "source": "/nonexistent/dir", "options": ["rbind"]})

    for edit, field in ((no_rootfs, b"root.path"), (wrong_type, b"process.terminal"),
                        (bad_namespace, b"linux.namespaces[6].type"),
                        (dotdot, b"mounts[5].destination"),
                        (missing_bind, b"mounts[5].source")):
        result = case(edit)
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 1, result.stderr
        assert len(lines) == 1 and field.decode() in lines[0], lines
        assert not (runv.root / "bad").exists()
    bad_json = tmp_path / "badjson"
    (bad_json / "rootfs").mkdir(parents=True)
    (bad_json / "config.json").write_text("{not json")
    result = runv("create", "--bundle", str(bad_json), "bad", check=False)
    assert result.returncode == 1 and b"config.json" in result.stderr
    assert runv("create", "--bundle", str(bad_json), "../x", check=False).returncode == 1
    assert runv.leftovers() == []


def test_events_stream_reports_oom_and_exit(runv: Runv, tmp_path: Path) -> None:
    def limited(spec: dict[str, Any]) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 32 << 20, "swap": 32 << 20}}

    bundle = runv.bundle(["sh", "-c", "read go; head -c 200000000 /dev/zero | tail"],
                         edit=limited)
    r_in, w_in = os.pipe()
    runv("create", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "c1",
         stdin=r_in)
    os.close(r_in)
    pid = int((tmp_path / "pid").read_text())
    with open(tmp_path / "events", "wb") as out:
        events = runv.popen("events", "c1", stdout=out, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
        try:
            runv("start", "c1")
            time.sleep(1)  # the stream is open
            os.write(w_in, b"go\n")
            os.close(w_in)
            assert reap(pid) == 137  # killed by the OOM killer
            assert events.wait(timeout=60) == 0  # the stream ends when the container does
        finally:
            if events.poll() is None:
                events.kill()
                events.wait()
    lines = [json.loads(line) for line in (tmp_path / "events").read_text().splitlines()]
    kinds = [e["type"] for e in lines]
    assert "oom" in kinds and kinds[-1] == "exit", lines
    assert lines[-1]["id"] == "c1" and lines[-1]["data"]["status"] == 137
    runv("delete", "c1")
