"""containerd 1.6 with runv-py's own shim (`--runtime io.containerd.runv.v2`): containerd starts
`containerd-shim-runv-v2` from its PATH, talks ttrpc to it and receives its events; every task
runs in its own VM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def test_run_rm_output_exit_code_and_events(cd: Containerd, tmp_path: Path) -> None:
    with open(tmp_path / "events", "wb") as out:
        events = subprocess.Popen(["ctr", "--address", cd.address, "events"], stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        result = cd.ctr("run", "--rm", *RUNTIME, IMAGE, "s1", "sh", "-c",
                        "echo hello; echo oops >&2; exit 3", check=False)
        time.sleep(0.5)
    finally:
        events.terminate()
        events.wait()
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
    _wait_status(cd, "s2", "STOPPED")
    cd.ctr("task", "delete", "s2")
    cd.ctr("container", "delete", "s2")
    assert "s2" not in _tasks(cd)


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
