"""One detached container shared by read-only checks (ps, exec, logs, inspect, volumes,
limits), then the commands that end it (kill, stop, wait, rm); and a killed monitor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py import child
from tests.hyperctl.conftest import HYPERCTL, Hyperctl
from tests.vm.conftest import processes_mentioning

pytestmark = pytest.mark.vm

LOOP = ("trap 'echo got-term; exit 9' TERM; trap 'echo got-usr1' USR1; "
        "i=0; while :; do echo tick $i; i=$((i+1)); sleep 1; done")


@pytest.fixture(scope="module")
def web(shared_hyperctl: Hyperctl, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[Hyperctl, Path]]:
    vols = tmp_path_factory.mktemp("vols")
    (vols / "rw").mkdir()
    os.chown(vols / "rw", 65534, 65534)   # guest root is the host's nobody on volumes
    (vols / "ro").mkdir()
    (vols / "ro" / "given.txt").write_text("from host\n")
    env_file = vols / "env"
    env_file.write_text("# job settings\nFROM_FILE=yes\n")
    hc = shared_hyperctl
    result = hc("run", "-d", "--name", "web", "-e", "GREETING=hi there", "--env-file",
                str(env_file), "-w", "/tmp", "--hostname", "webhost", "-u", "1000:1000",
                "-v", f"{vols / 'rw'}:/rw", "-v", f"{vols / 'ro'}:/ro:ro", "--memory", "96m",
                "--cpus", "1", "busybox", "sh", "-c", LOOP)
    assert len(result.stdout.strip()) == 32, result.stdout
    yield hc, vols
    hc("rm", "-f", "web", check=False)


def test_ps_and_inspect(web: tuple[Hyperctl, Path]) -> None:
    hc, _ = web
    rows = json.loads(hc("ps", "--format", "json").stdout)
    assert [(r["name"], r["status"]) for r in rows] == [("web", "running")]
    info = hc.inspect("web")
    assert info["image"] == "busybox:latest"
    assert info["state"]["status"] == "running"
    assert info["config"]["user"] == {"uid": 1000, "gid": 1000}
    assert info["config"]["resources"]["memory"] == {"limit": 96 << 20}
    assert hc.inspect(info["id"][:6])["name"] == "web"


def test_exec_sees_the_settings(web: tuple[Hyperctl, Path]) -> None:
    hc, _ = web
    out = hc("exec", "web", "sh", "-c",
             'echo "$GREETING|$FROM_FILE|$(pwd)|$(hostname)|$(id -u):$(id -g)"').stdout
    assert out == b"hi there|yes|/tmp|webhost|1000:1000\n"
    assert hc("exec", "-u", "0", "-w", "/", "-e", "X=1", "web", "sh", "-c",
              'echo "$(id -u) $(pwd) $X"').stdout == b"0 / 1\n"
    result = hc("exec", "web", "sh", "-c", "exit 42", check=False)
    assert result.returncode == 42
    for program, code in (("nosuch", 127), ("/etc/passwd", 126)):
        result = hc("exec", "web", program, check=False)
        assert result.returncode == code and f"exec {program}: ".encode() in result.stderr
    result = hc("exec", "-i", "web", "cat", input=b"piped\n")
    assert result.stdout == b"piped\n"
    code, output = hc.in_pty("exec", "-t", "web", "sh", "-c", "tty; exit 3")
    assert code == 3 and b"/dev/pts/" in output, output


def test_limits_reach_the_container(web: tuple[Hyperctl, Path]) -> None:
    hc, _ = web
    out = hc("exec", "web", "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max").stdout
    assert out.split() == [str(96 << 20).encode(), b"100000", b"100000"]


def test_volumes(web: tuple[Hyperctl, Path]) -> None:
    hc, vols = web
    hc("exec", "-u", "0", "web", "sh", "-c", "echo from guest > /rw/out.txt")
    assert (vols / "rw" / "out.txt").read_text() == "from guest\n"
    assert (vols / "rw" / "out.txt").stat().st_uid == 65534
    assert hc("exec", "web", "cat", "/ro/given.txt").stdout == b"from host\n"
    result = hc("exec", "-u", "0", "web", "touch", "/ro/nope", check=False)
    assert result.returncode != 0 and not (vols / "ro" / "nope").exists()


def test_logs_and_follow(web: tuple[Hyperctl, Path]) -> None:
    hc, _ = web
    deadline = time.monotonic() + 30
    while b"tick 2\n" not in (out := hc("logs", "web").stdout):
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
    assert out.startswith(b"tick 0\ntick 1\n")
    follow = subprocess.Popen([HYPERCTL, "logs", "-f", "web"], env=hc.env,
                              stdout=subprocess.PIPE)
    try:
        time.sleep(3)
        assert follow.poll() is None, "logs -f ended while the container runs"
    finally:
        follow.kill()
        follow.wait()


def test_zz_kill_stop_wait_rm(web: tuple[Hyperctl, Path]) -> None:
    """Runs last in the module: ends the shared container."""
    hc, _ = web
    result = hc("rm", "web", check=False)
    assert result.returncode == 1 and b"is running: stop it first, or use rm -f" in result.stderr
    waiter = subprocess.Popen([HYPERCTL, "wait", "web"], env=hc.env, stdout=subprocess.PIPE)
    follow = subprocess.Popen([HYPERCTL, "logs", "-f", "web"], env=hc.env,
                              stdout=subprocess.PIPE)
    assert hc("kill", "-s", "USR1", "web").stdout == b"web\n"
    deadline = time.monotonic() + 30
    while b"got-usr1" not in hc("logs", "web").stdout:
        assert time.monotonic() < deadline, "USR1 did not reach the container"
        time.sleep(0.5)
    assert hc("ps", "-q").stdout.strip() != b""   # the trap kept it running
    hc("stop", "-t", "30", "web")   # the trap answers TERM with exit 9
    assert waiter.communicate(timeout=60)[0] == b"9\n"
    assert follow.communicate(timeout=60)[0].endswith(b"got-term\n")
    assert json.loads(hc("ps", "-a", "--format", "json").stdout)[0]["exit_code"] == 9
    assert hc("ps", "-q").stdout == b""
    result = hc("kill", "web", check=False)
    assert result.returncode == 1 and b"is not running (exited)" in result.stderr
    assert hc("wait", "web").stdout == b"9\n"
    hc("rm", "web")
    assert hc("ps", "-a", "-q").stdout == b""


def test_kill_returns_once_the_container_has_exited(hyperctl: Hyperctl) -> None:
    """As docker kill: `kill` (SIGKILL) and then `rm` works, without a wait between (the soak's
    hyperctl door met 'is running' from an rm right after a kill)."""
    cid = hyperctl("run", "-d", "busybox", "sleep", "600").stdout.decode().strip()[:12]
    probe = ("import sys\nfrom runv_py.cli.hyperctl import main\n"
             "def call(*argv):\n    try:\n        return main(list(argv))\n"
             "    except SystemExit as exc:\n        return exc.code\n"
             f"print(call('kill', {cid!r}), call('rm', {cid!r}))")
    result = subprocess.run([sys.executable, "-c", probe], env=hyperctl.env, timeout=120,
                            capture_output=True, check=False)
    assert result.stdout.split()[-2:] == [b"0", b"0"], result.stderr.decode()
    assert hyperctl("ps", "-a", "-q").stdout == b""


def test_killed_monitor_leaves_an_exited_container_that_rm_cleans(hyperctl: Hyperctl) -> None:
    cid = hyperctl("run", "-d", "busybox", "sleep", "600").stdout.decode().strip()
    meta = json.loads((hyperctl.data / "containers" / cid / "meta.json").read_text())
    assert child.is_running(meta["monitor_pid"], meta["monitor_start"])
    os.kill(meta["monitor_pid"], signal.SIGKILL)
    assert hyperctl("wait", cid[:8], timeout=120).stdout == b"137\n"
    assert "Exited (137)" in hyperctl("ps", "-a").stdout.decode()
    hyperctl("rm", cid)
    assert hyperctl.leftovers() == []


def test_rm_force_of_a_container_whose_monitor_stopped_mid_create(hyperctl: Hyperctl) -> None:
    """The monitor creates the container under its lock; stopped there (SIGSTOP, a debugger),
    it must not make `rm -f` wait forever."""
    run = subprocess.Popen([HYPERCTL, "run", "-d", "--name", "stuck", "busybox", "sleep", "600"],
                           env=hyperctl.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not [line for line in processes_mentioning(str(hyperctl.root))
               if "runv_py.sandbox.supervisor" in line]:
        assert time.monotonic() < deadline, "no supervisor started"
        time.sleep(0.02)
    monitor = next(int(line.split(":")[0]) for line in processes_mentioning(str(hyperctl.root))
                   if "runv_py.workload.monitor" in line)
    os.kill(monitor, signal.SIGSTOP)
    hyperctl("rm", "-f", "stuck", timeout=90)
    run.wait(60)
    assert b"stuck" not in hyperctl("ps", "-a").stdout
    # A supervisor still booting when its monitor was killed may claim its VM directory
    # after rm looked for it; that directory's owner is dead once it has stopped, and the
    # reconciler removes it.
    hyperctl("system", "prune", "-f")
    assert hyperctl.leftovers() == []
