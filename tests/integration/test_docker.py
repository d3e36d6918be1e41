"""docker (Debian's docker.io 20.10) with `dockerd --add-runtime runv=...` and `docker run
--runtime runv`: a dockerd of the test's own (its own data root, exec root, socket and
containerd; no bridge, no iptables), an image imported from the busybox rootfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py.sandbox import cgroup
from tests.cli.conftest import RUNV
from tests.vm.conftest import processes_mentioning

# /usr/local/bin may hold another docker client: Debian's goes with Debian's daemon.
DOCKER = "/usr/bin/docker"
IMAGE = "runvtest:latest"


class Docker:
    def __init__(self, top: Path, env: dict[str, str]) -> None:
        self.top = top
        self.socket = top / "docker.sock"
        self.log = open(top / "dockerd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(top / "data"), "--exec-root", str(top / "exec"),
             "--host", f"unix://{self.socket}", "--pidfile", str(top / "dockerd.pid"),
             "--bridge", "none", "--iptables=false", "--ip6tables=false",
             "--ip-forward=false", "--ip-masq=false", "--storage-driver", "overlay2",
             "--exec-opt", "native.cgroupdriver=cgroupfs", "--add-runtime", f"runv={RUNV}"],
            env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while self("version", check=False).returncode != 0:
            assert self.proc.poll() is None, (top / "dockerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dockerd did not come up"
            time.sleep(0.3)

    def __call__(self, *args: str, check: bool = True, timeout: float = 300
                 ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([DOCKER, "--host", f"unix://{self.socket}", *args],
                                capture_output=True, timeout=timeout, check=False,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            ids = self("ps", "-aq", check=False).stdout.decode().split()
            if ids:
                self("rm", "--force", *ids, check=False)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        # dockerd's containerd and shims name the exec root; none may outlive it.
        for line in processes_mentioning(str(self.top / "exec")):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        subprocess.run(["umount", "-R", str(self.top / "data")], capture_output=True,
                       check=False)


@pytest.fixture
def docker(runtime_env: dict[str, str], busybox_rootfs: Path) -> Iterator[Docker]:
    if not shutil.which("dockerd") or not Path(DOCKER).exists():
        pytest.fail("dockerd or /usr/bin/docker is missing: apt-get install docker.io")
    top = Path(tempfile.mkdtemp(prefix="dk-"))  # the containerd socket path must stay short
    daemon = Docker(top, runtime_env)
    try:
        archive = top / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(busybox_rootfs, arcname=".")
        daemon("import", str(archive), IMAGE)
        yield daemon
    finally:
        daemon.close()
        shutil.rmtree(top, ignore_errors=True)


def test_docker_run_exec_stop_with_runtime_runv(docker: Docker) -> None:
    run = docker("run", "--rm", "--runtime", "runv", "--network", "none", IMAGE, "sh", "-c",
                 "uname -r; echo hi from docker; exit 3", check=False)
    assert run.returncode == 3, run.stderr
    kernel, greeting = run.stdout.decode().splitlines()
    assert kernel != os.uname().release and greeting == "hi from docker"

    cid = docker("run", "-d", "--runtime", "runv", "--network", "none", "--memory", "64m",
                 IMAGE, "sleep", "600").stdout.decode().strip()
    exec_result = docker("exec", cid, "sh", "-c", "cat /sys/fs/cgroup/memory.max; exit 5",
                         check=False)
    assert exec_result.returncode == 5 and exec_result.stdout == b"67108864\n"
    # docker's cgroupsPath (/docker/ID): the container's host processes are there.
    pid = int(docker("inspect", "--format", "{{.State.Pid}}", cid).stdout)
    assert cgroup.memberships(pid)["memory"] == f"/docker/{cid}"
    docker("stop", "--time", "1", cid)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip() == b"137"
    docker("rm", cid)
    roots = cgroup.roots(cgroup.memberships())
    assert not (roots["memory"] / "docker" / cid).exists()
