"""containerd 1.6 with runv-py's own shim (`--runtime io.containerd.runv.v2`): containerd starts
`containerd-shim-runv-v2` from its PATH, talks ttrpc to it and receives its events; every task
runs in its own VM, except a pod's containers (CRI annotations), which share their sandbox's."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from runv_py import child
from runv_py.errors import RunvError
from runv_py.sandbox.client import BlockingSupervisorClient
from runv_py.sandbox.protocol import State
from runv_py.sandbox.status import ContainerStatus
from runv_py.shim import task, ttrpc
from runv_py.shim._pb import task_pb2
from tests.vm.conftest import processes_mentioning

from .conftest import IMAGE, Containerd

RUNTIME = ["--runtime", "io.containerd.runv.v2"]
VENV_BIN = str(Path(sys.executable).parent)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "shim.md"


@pytest.fixture
def shim_env(runtime_env: dict[str, str]) -> dict[str, str]:
    """containerd looks up containerd-shim-runv-v2 on its PATH."""
    return dict(runtime_env, PATH=f"{VENV_BIN}:{runtime_env.get('PATH', '/usr/bin:/bin')}")


@pytest.fixture
def cd(tmp_path: Path, shim_env: dict[str, str], image_archive: Path) -> Iterator[Containerd]:
    daemon = Containerd(tmp_path, shim_env)
    try:
        daemon.ctr("image", "import", str(image_archive))
        yield daemon
    finally:
        daemon.close()
        assert not _mounts_under(tmp_path / "state"), _mounts_under(tmp_path / "state")


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table if line.split()[4].startswith(str(path))]


def _tasks(cd: Containerd) -> dict[str, str]:
    """id -> status from `ctr task ls`."""
    lines = cd.ctr("task", "ls").stdout.decode().splitlines()[1:]
    return {fields[0]: fields[2] for fields in (line.split() for line in lines) if fields}


def _wait_status(cd: Containerd, task: str, status: str | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _tasks(cd).get(task) != status:
        assert time.monotonic() < deadline, f"{task}: {_tasks(cd)}, wanted {status}"
        time.sleep(0.2)


def _run_watching_events(cd: Containerd, events_file: Path, *args: str
                         ) -> subprocess.CompletedProcess[bytes]:
    """`ctr run --rm ARGS` while `ctr events` writes containerd's events to events_file."""
    with open(events_file, "wb") as out:
        events = subprocess.Popen(["ctr", "--address", cd.address, "events"], stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        result = cd.ctr("run", "--rm", *RUNTIME, *args, check=False)
        time.sleep(0.5)
    finally:
        events.terminate()
        events.wait()
    return result


def test_run_rm_output_exit_code_and_events(cd: Containerd, tmp_path: Path) -> None:
    result = _run_watching_events(cd, tmp_path / "events", IMAGE, "s1", "sh", "-c",
                                  "echo hello; echo oops >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"hello\n"
    assert result.stderr == b"oops\n"
    assert "s1" not in _tasks(cd)
    assert "s1" not in cd.ctr("container", "ls", "-q").stdout.decode().split()
    topics = [line.split()[5] for line in (tmp_path / "events").read_text().splitlines()
              if "/tasks/" in line and '"s1"' in line]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    exit_line = next(line for line in (tmp_path / "events").read_text().splitlines()
                     if "/tasks/exit" in line)
    assert '"exit_status":3' in exit_line.replace(" ", ""), exit_line


def test_stdin_reaches_the_process(cd: Containerd) -> None:
    result = subprocess.run(
        ["ctr", "--address", cd.address, "--namespace", "runvtest", "run", "--rm", *RUNTIME,
         IMAGE, "s-in", "sh", "-c", "read line; echo got $line"],
        input=b"abc\n", capture_output=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"got abc\n"


def test_exec_pause_resume_metrics_kill(cd: Containerd) -> None:
    cd.ctr("run", "-d", *RUNTIME, IMAGE, "s2", "sleep", "600")
    assert _tasks(cd)["s2"] == "RUNNING"

    result = cd.ctr("task", "exec", "--exec-id", "e1", "s2", "sh", "-c", "echo in; exit 5",
                    check=False)
    assert result.returncode == 5, result.stderr
    assert result.stdout == b"in\n"

    pids = cd.ctr("task", "ps", "s2").stdout.decode()
    assert len(pids.splitlines()) >= 2, pids

    cd.ctr("task", "pause", "s2")
    assert _tasks(cd)["s2"] == "PAUSED"
    cd.ctr("task", "resume", "s2")
    assert _tasks(cd)["s2"] == "RUNNING"

    metrics = cd.ctr("task", "metrics", "s2").stdout.decode()
    assert "memory.usage_in_bytes" in metrics or "memory" in metrics, metrics
    assert "pids.current" in metrics or "pids" in metrics, metrics

    cd.ctr("task", "kill", "--signal", "SIGKILL", "s2")
    cd.ctr("task", "delete", "s2")  # right after, as with runc: kill answers after the exit
    cd.ctr("container", "delete", "s2")
    assert "s2" not in _tasks(cd)


def test_sigkill_ends_a_task_whose_supervisor_is_stopped(cd: Containerd, tmp_path: Path
                                                        ) -> None:
    """The soak's shim task that could not be removed: its supervisor stopped for good in a
    resume. `ctr task kill -s KILL` ends the sandbox instead; the task exits 137 and the
    forced removal containerd users do goes through, leaving nothing."""
    cd.ctr("run", "-d", *RUNTIME, IMAGE, "s9", "sleep", "600")
    bundle = tmp_path / "state" / "io.containerd.runtime.v2.task" / "runvtest" / "s9"
    supervisor = next(int(line.partition(":")[0]) for line in processes_mentioning(str(bundle))
                      if "runv_py.sandbox.supervisor" in line)
    cd.ctr("task", "pause", "s9")
    os.kill(supervisor, signal.SIGSTOP)
    resume = subprocess.Popen(["ctr", "--address", cd.address, "--namespace", "runvtest",
                               "task", "resume", "s9"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        cd.ctr("task", "kill", "--signal", "SIGKILL", "s9", timeout=60)
        _wait_status(cd, "s9", "STOPPED")
        assert resume.wait(timeout=60) != 0
    finally:
        resume.kill()
        resume.wait()
    deleted = cd.ctr("task", "delete", "s9", timeout=60)
    assert b"exit code 137" in deleted.stderr, deleted.stderr
    cd.ctr("container", "delete", "s9")
    assert "s9" not in _tasks(cd)
    assert processes_mentioning(str(bundle)) == []


def test_oom_kill_becomes_an_oom_event(cd: Containerd, tmp_path: Path) -> None:
    result = _run_watching_events(cd, tmp_path / "events", "--memory-limit", str(32 << 20),
                                  IMAGE, "s6", "sh", "-c", "head -c 200000000 /dev/zero | tail")
    assert result.returncode == 137, result.stderr
    topics = [line.split()[5] for line in (tmp_path / "events").read_text().splitlines()
              if '"s6"' in line]
    assert "/tasks/oom" in topics, topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/delete"), topics


def test_terminal_size_reaches_the_process(cd: Containerd) -> None:
    """`ctr run -t` sends its terminal's size (ResizePty) once the task has started."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    proc = subprocess.Popen(["ctr", "--address", cd.address, "--namespace", "runvtest", "run",
                             "--rm", "-t", *RUNTIME, IMAGE, "s7", "sh", "-c",
                             "sleep 2; stty size"],
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the slave has closed it
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=60) == 0, output
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"33 101" in output, output


def test_update_through_the_shim(cd: Containerd, tmp_path: Path) -> None:
    """ctr 1.6 has no `task update`: containerd's Update call, sent to the shim's ttrpc socket
    as containerd sends it, changes the limits the guest enforces and grows the VM for them
    (docs/resize.md)."""
    cd.ctr("run", "-d", *RUNTIME, IMAGE, "s8", "sleep", "600")

    def mem_total_kib(exec_id: str) -> int:
        meminfo = cd.ctr("task", "exec", "--exec-id", exec_id, "s8", "head", "-1",
                         "/proc/meminfo").stdout.decode()
        return int(meminfo.split()[1])

    before_kib = mem_total_kib("m1")
    bundle = tmp_path / "state" / "io.containerd.runtime.v2.task" / "runvtest" / "s8"
    address = (bundle / "address").read_text().removeprefix("unix://")
    resources = {"memory": {"limit": 48 << 20}, "pids": {"limit": 40}}

    async def update() -> None:
        client = await ttrpc.Client.connect(address)
        try:
            await client.call(task.SERVICE, "Update", task_pb2.UpdateTaskRequest(
                id="s8", resources=any_pb2.Any(type_url=task.RESOURCES_URL,
                                               value=json.dumps(resources).encode())
            ).SerializeToString(), metadata={"containerd-namespace": "runvtest"})
        finally:
            await client.close()

    asyncio.run(update())
    metrics = json.loads(cd.ctr("task", "metrics", "--format", "json", "s8").stdout)
    assert metrics["memory"]["usage_limit"] == 48 << 20, metrics
    assert metrics["pids"]["limit"] == 40, metrics
    assert mem_total_kib("m2") - before_kib == 128 << 10  # one memory block more
    cd.ctr("task", "kill", "--signal", "SIGKILL", "s8")
    _wait_status(cd, "s8", "STOPPED")
    cd.ctr("task", "delete", "s8")
    cd.ctr("container", "delete", "s8")


def test_log_uri_file_and_binary(cd: Containerd, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "out.log"
    result = cd.ctr("run", "--rm", *RUNTIME, "--log-uri", f"file://{log_file}", IMAGE, "s3",
                    "sh", "-c", "echo to-file; echo err-to-file >&2", check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(log_file.read_text().splitlines()) == ["err-to-file", "to-file"]

    # A logging binary as containerd's runc shim starts one: stdout on fd 3, stderr on fd 4,
    # fd 5 closed once it is ready; CONTAINER_ID and CONTAINER_NAMESPACE in its environment.
    logger = tmp_path / "logger"
    captured = tmp_path / "captured"
    logger.write_text(f"""#!{sys.executable}
import os, sys
out = open({str(captured)!r} + "-" + sys.argv[2], "wb")
os.close(5)
out.write((os.environ["CONTAINER_ID"] + " " + os.environ["CONTAINER_NAMESPACE"] + "\\n").encode())
for fd in (3, 4):
    while data := os.read(fd, 65536):
        out.write(data)
""")
    logger.chmod(0o755)
    result = cd.ctr("run", "--rm", *RUNTIME, "--log-uri", f"binary://{logger}?tag=t1", IMAGE,
                    "s4", "sh", "-c", "echo via-binary; echo err-binary >&2", check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "captured-t1").read_text() == "s4 runvtest\nvia-binary\nerr-binary\n"


def test_killed_shim_is_cleaned_up(cd: Containerd, tmp_path: Path) -> None:
    cd.ctr("run", "-d", *RUNTIME, IMAGE, "s5", "sleep", "600")
    bundle = tmp_path / "state" / "io.containerd.runtime.v2.task" / "runvtest" / "s5"
    shim_pid = int((bundle / "shim.pid").read_text())
    assert processes_mentioning("-id s5")
    os.kill(shim_pid, signal.SIGKILL)
    # containerd notices the closed connection, runs `containerd-shim-runv-v2 delete` and
    # forgets the task.
    deadline = time.monotonic() + 30
    while bundle.exists() or processes_mentioning(str(bundle)):
        assert time.monotonic() < deadline, processes_mentioning(str(bundle))
        time.sleep(0.2)
    assert "s5" not in _tasks(cd)
    assert "cleaning up dead shim" in (tmp_path / "containerd.log").read_text()
    assert "failed to clean up" not in (tmp_path / "containerd.log").read_text()
    cd.ctr("container", "delete", "s5")


SERVE = ("mkdir -p /tmp/www && echo pod-hello > /tmp/www/index.html && "
         "exec httpd -f -p 127.0.0.1:8080 -h /tmp/www")
FETCH = ("for i in $(seq 50); do wget -qO- http://127.0.0.1:8080/ && exit 0; sleep 0.2; done; "
         "exit 1")


def _pod(kind: str, sandbox: str) -> list[str]:
    """What the CRI plugin puts on a pod's containers, as `ctr run` options."""
    return ["--annotation", f"io.kubernetes.cri.container-type={kind}",
            "--annotation", f"io.kubernetes.cri.sandbox-id={sandbox}"]


def _qemus(env: dict[str, str]) -> list[str]:
    state = tomllib.loads(Path(env["RUNV_CONFIG"]).read_text())["state_dir"]
    return [line for line in processes_mentioning(state) if "qemu-system" in line]


def _shims(cd: Containerd) -> list[str]:
    return [line for line in processes_mentioning(cd.address)
            if "runv_py.shim.main" in line or "containerd-shim-runv-v2" in line]


def test_pod_shares_one_vm_and_localhost(cd: Containerd, shim_env: dict[str, str]) -> None:
    cd.ctr("run", "-d", *RUNTIME, *_pod("sandbox", "p1"), IMAGE, "p1", "sh", "-c", SERVE)
    # As the CRI does, c1 asks for the sandbox's IPC namespace by the host path of the
    # sandbox task's pid.
    pid = next(line.split()[1] for line in cd.ctr("task", "ls").stdout.decode().splitlines()[1:]
               if line.split()[0] == "p1")
    cd.ctr("run", "-d", *RUNTIME, *_pod("container", "p1"), "--with-ns",
           f"ipc:/proc/{pid}/ns/ipc", IMAGE, "c1", "sleep", "600")
    assert _tasks(cd) == {"p1": "RUNNING", "c1": "RUNNING"}
    assert len(_qemus(shim_env)) == 1, _qemus(shim_env)
    assert len(_shims(cd)) == 1, _shims(cd)

    # c1 reaches the server of p1 on the guest's localhost.
    result = cd.ctr("task", "exec", "--exec-id", "w", "c1", "sh", "-c", FETCH, check=False)
    assert (result.returncode, result.stdout) == (0, b"pod-hello\n"), result.stderr
    ipc = [cd.ctr("task", "exec", "--exec-id", "ns", task, "readlink", "/proc/self/ns/ipc").stdout
           for task in ("p1", "c1")]
    assert ipc[0] == ipc[1] and ipc[0].startswith(b"ipc:["), ipc
    metrics = cd.ctr("task", "metrics", "c1").stdout.decode()
    assert "pids" in metrics, metrics

    # Pausing one container of the pod leaves the other running.
    cd.ctr("task", "pause", "c1")
    assert _tasks(cd) == {"p1": "RUNNING", "c1": "PAUSED"}
    result = cd.ctr("task", "exec", "--exec-id", "w2", "p1", "sh", "-c", FETCH, check=False)
    assert (result.returncode, result.stdout) == (0, b"pod-hello\n"), result.stderr
    cd.ctr("task", "resume", "c1")
    assert _tasks(cd)["c1"] == "RUNNING"

    # The pod's container leaves the VM, which stays for the sandbox; then the sandbox goes.
    cd.ctr("task", "kill", "--signal", "SIGKILL", "c1")
    _wait_status(cd, "c1", "STOPPED")
    cd.ctr("task", "delete", "c1")
    cd.ctr("container", "delete", "c1")
    assert _tasks(cd) == {"p1": "RUNNING"}
    assert len(_qemus(shim_env)) == 1
    cd.ctr("task", "kill", "--signal", "SIGKILL", "p1")
    _wait_status(cd, "p1", "STOPPED")
    cd.ctr("task", "delete", "p1")
    cd.ctr("container", "delete", "p1")
    deadline = time.monotonic() + 30
    while _qemus(shim_env) or _shims(cd):
        assert time.monotonic() < deadline, _qemus(shim_env) + _shims(cd)
        time.sleep(0.2)


def test_pod_container_without_its_sandbox_fails(cd: Containerd) -> None:
    result = cd.ctr("run", "--rm", *RUNTIME, *_pod("container", "nope"), IMAGE, "c9", "true",
                    check=False)
    assert result.returncode != 0
    assert "pod sandbox nope" in result.stderr.decode(), result.stderr
    cd.ctr("container", "delete", "c9", check=False)
    assert not _shims(cd)


def test_killed_pod_shim_is_cleaned_up(cd: Containerd, shim_env: dict[str, str],
                                       tmp_path: Path) -> None:
    cd.ctr("run", "-d", *RUNTIME, *_pod("sandbox", "p2"), IMAGE, "p2", "sleep", "600")
    cd.ctr("run", "-d", *RUNTIME, *_pod("container", "p2"), IMAGE, "c2", "sleep", "600")
    assert len(_qemus(shim_env)) == 1
    shim_pid = int((tmp_path / "state" / "io.containerd.runtime.v2.task" / "runvtest" / "p2"
                    / "shim.pid").read_text())
    os.kill(shim_pid, signal.SIGKILL)
    # containerd runs `containerd-shim-runv-v2 delete` for both tasks; the VM goes with the
    # first.
    deadline = time.monotonic() + 60
    while _tasks(cd) or _qemus(shim_env):
        assert time.monotonic() < deadline, (_tasks(cd), _qemus(shim_env))
        time.sleep(0.2)
    assert "failed to clean up" not in (tmp_path / "containerd.log").read_text()
    cd.ctr("container", "delete", "c2", "p2")


def _doc_block(lang: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"```{lang}\n") + len(f"```{lang}\n")
    return text[start:text.index("```", start)]


def test_cri_runtime_config_loads(tmp_path: Path, shim_env: dict[str, str]) -> None:
    """The CRI runtime handler documented in docs/shim.md, in a containerd 1.6 with the CRI
    plugin enabled: containerd parses it and the CRI plugin loads with it."""
    runv_config = tmp_path / "runv.toml"
    runv_config.write_text(Path(shim_env["RUNV_CONFIG"]).read_text())
    handler = _doc_block("toml").replace("/etc/runv/config.toml", str(runv_config))
    config = tmp_path / "containerd.toml"
    address = tmp_path / "cri.sock"
    config.write_text(handler.replace("version = 2\n", f"""version = 2
root = "{tmp_path / 'root'}"
state = "{tmp_path / 'state'}"
[grpc]
  address = "{address}"
""", 1))
    dump = subprocess.run(["containerd", "--config", str(config), "config", "dump"],
                          capture_output=True, check=True, timeout=60).stdout.decode()
    assert 'runtime_type = "io.containerd.runv.v2"' in dump, dump
    assert f'ConfigPath = "{runv_config}"' in dump, dump

    with open(tmp_path / "containerd.log", "wb") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config)], env=shim_env,
                                  stdout=log, stderr=log)
    try:
        ctr = ["ctr", "--address", str(address)]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True,
                             check=False).returncode != 0:
            assert daemon.poll() is None, (tmp_path / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not come up"
            time.sleep(0.2)
        plugins = subprocess.run([*ctr, "plugins", "ls"], capture_output=True, check=True,
                                 timeout=30).stdout.decode()
        cri = [line.split() for line in plugins.splitlines() if " cri " in f" {line} "]
        assert cri and cri[0][-1] == "ok", plugins
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        subprocess.run(["umount", "-R", str(tmp_path / "root")], capture_output=True,
                       check=False)


def test_a_shim_containerd_gave_up_on_before_calling_it_exits(
        tmp_path: Path, shim_env: dict[str, str]) -> None:
    """A `start` killed after it spawned the long-lived shim fails in containerd, which
    removes the task's bundle and never calls that shim (the soak met one left running):
    the shim sees its bundle gone and exits, removing its socket."""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(
        {"ociVersion": "1.1.0", "root": {"path": "rootfs"},
         "process": {"args": ["true"], "cwd": "/"}}))
    started = subprocess.run(
        ["containerd-shim-runv-v2", "-namespace", "gaveup", "-address",
         str(tmp_path / "containerd.sock"), "-publish-binary", "/bin/true", "-id", "g1",
         "start"], cwd=bundle, env=shim_env, input=b"", capture_output=True, timeout=60,
        check=True)
    socket_path = Path(started.stdout.decode().removeprefix("unix://"))
    shim = int((bundle / "shim.pid").read_text())
    shim_start = child.proc_start_time(shim)
    assert shim_start is not None and socket_path.exists()
    try:
        shutil.rmtree(bundle)
        deadline = time.monotonic() + 10
        while child.is_running(shim, shim_start) and time.monotonic() < deadline:
            child.reap_if_child(shim)
            time.sleep(0.1)
        assert not child.is_running(shim, shim_start), "the shim outlived its bundle"
        assert not socket_path.exists()
    finally:
        if child.is_running(shim, shim_start):
            os.kill(shim, signal.SIGKILL)


def test_shim_killed_between_its_sandbox_and_its_record_leaves_nothing(
        cd: Containerd, tmp_path: Path, shim_env: dict[str, str]) -> None:
    """The shim dies after the sandbox's supervisor reported its container created and
    before the shim wrote the record: containerd's cleanup (`containerd-shim-runv-v2
    delete`) must still stop that supervisor and its VM."""
    run = subprocess.Popen(["ctr", "--address", cd.address, "--namespace", "runvtest", "run",
                            "-d", *RUNTIME, IMAGE, "s9", "sleep", "600"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = tmp_path / "state" / "io.containerd.runtime.v2.task" / "runvtest" / "s9" / \
        "shim.pid"
    deadline = time.monotonic() + 120
    while not [line for line in processes_mentioning("--id s9 ")
               if "runv_py.sandbox.supervisor" in line]:
        assert time.monotonic() < deadline and run.poll() is None, "no supervisor for s9"
        time.sleep(0.02)
    shim = int(pid_file.read_text())
    os.kill(shim, signal.SIGSTOP)  # its supervisor's report waits in the pipe
    sandboxes = Path(tomllib.loads(Path(shim_env["RUNV_CONFIG"]).read_text())["state_dir"]) / \
        "sandboxes"
    while not (sockets := list(sandboxes.glob("*/ctl.sock"))):
        assert time.monotonic() < deadline, "no control socket"
        time.sleep(0.05)
    client = BlockingSupervisorClient(sockets[0])
    while True:
        with contextlib.suppress(OSError, RunvError):
            if client.call(State(container="s9")).status is ContainerStatus.CREATED:
                break
        assert time.monotonic() < deadline, "s9 was not created"
        time.sleep(0.1)
    time.sleep(1)
    os.kill(shim, signal.SIGKILL)
    assert run.wait(60) != 0
    deadline = time.monotonic() + 60
    while processes_mentioning("--id s9 "):
        assert time.monotonic() < deadline, processes_mentioning("--id s9 ")
        time.sleep(0.2)
    assert "s9" not in _tasks(cd)
    cd.ctr("container", "delete", "s9", check=False)
