"""podman --runtime runv (with conmon): run, -it with a terminal, exec, stop and kill, from an
image loaded from an OCI archive; podman's own state under a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import RUNV

from .conftest import IMAGE


class Podman:
    def __init__(self, top: Path, env: dict[str, str]) -> None:
        self.top = top
        conf = top / "containers.conf"
        # Without default_ulimits every runtime fails to set rlimits here.
        conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", '
                        '"nproc=4096:4096"]\n[engine]\ncgroup_manager = "cgroupfs"\n'
                        'events_logger = "file"\n')
        (top / "bin").mkdir()
        runtime = top / "bin" / "runv"  # podman names the runtime after the file
        # podman starts the runtime with an environment of its own: runv's settings go in
        # through a wrapper (else it would use /etc/runv/config.toml and the default assets).
        settings = " ".join(f"{k}='{env[k]}'" for k in ("RUNV_CONFIG", "RUNV_ASSETS_DIR",
                                                         "RUNV_TEMPLATE_DIR") if k in env)
        runtime.write_text(f'#!/bin/sh\nexec env {settings} {RUNV} "$@"\n')
        runtime.chmod(0o755)
        self.env = dict(env, CONTAINERS_CONF=str(conf))
        self.base = ["podman", "--root", str(top / "storage"), "--runroot", str(top / "run"),
                     "--tmpdir", str(top / "tmp"), "--storage-driver", "overlay",
                     "--runtime", str(runtime)]

    def argv(self, *args: str) -> list[str]:
        return [*self.base, *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300
                 ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(self.argv(*args), capture_output=True, env=self.env,
                                timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def close(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("system", "reset", "--force", check=False)


@pytest.fixture
def podman(tmp_path: Path, runtime_env: dict[str, str], image_archive: Path
           ) -> Iterator[Podman]:
    top = Path(tempfile.mkdtemp(prefix="pm-"))  # podman refuses a runroot over 50 bytes
    tool = Podman(top, runtime_env)
    try:
        tool("load", "--input", str(image_archive))
        yield tool
    finally:
        tool.close()
        shutil.rmtree(top, ignore_errors=True)


def test_podman_run_exec_stop_kill(podman: Podman) -> None:
    result = podman("run", "--rm", "--network", "none", IMAGE, "sh", "-c",
                    "echo hi from podman; exit 4", check=False)
    assert result.returncode == 4 and result.stdout == b"hi from podman\n", result.stderr

    podman("run", "-d", "--name", "s1", "--network", "none", IMAGE, "sleep", "600")
    exec_result = podman("exec", "s1", "sh", "-c", "echo exec ok; exit 6", check=False)
    assert exec_result.returncode == 6 and exec_result.stdout == b"exec ok\n"
    podman("stop", "--time", "1", "s1")  # sleep as pid 1 ignores TERM: podman kills it
    assert b"Exited (137)" in podman("ps", "--all").stdout
    podman("rm", "s1")

    podman("run", "-d", "--name", "s2", "--network", "none", IMAGE, "sh", "-c",
           "trap 'exit 9' TERM; while :; do sleep 0.1; done")
    time.sleep(1)  # let the trap be installed
    podman("kill", "--signal", "TERM", "s2")
    assert podman("wait", "s2").stdout.strip() == b"9"
    podman("rm", "s2")


def test_podman_run_interactive_tty(podman: Podman) -> None:
    master, slave = os.openpty()
    proc = subprocess.Popen(podman.argv("run", "--rm", "-it", "--network", "none", IMAGE,
                                        "sh", "-c", "tty; read line; echo got:$line; exit 2"),
                            stdin=slave, stdout=slave, stderr=slave, env=podman.env,
                            start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 120
    sent = False
    while proc.poll() is None or output.count(b"\n") < 1:
        assert time.monotonic() < deadline, output
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        output += chunk
        if not sent and b"/dev/pts/" in output:
            os.write(master, b"typed\r")
            sent = True
        if b"got:typed" in output:
            break
    assert proc.wait(timeout=60) == 2
    os.close(master)
    assert b"/dev/pts/" in output and b"got:typed" in output


def test_podman_tmpfs_privileged_and_limits(podman: Podman) -> None:
    """What podman hands a runtime for --tmpfs (tmpcopyup), --privileged (every capability,
    the host's devices listed with their type bits in fileMode) and --memory/--pids-limit
    (no cgroup namespace on a cgroup v1 host: /sys/fs/cgroup must still be the container's)."""
    tmpfs = podman("run", "--rm", "--network", "none", "--tmpfs", "/etc", "--tmpfs", "/scratch",
                   IMAGE, "sh", "-c", "cat /etc/group; touch /etc/new /scratch/x && "
                   "awk '$5 == \"/etc\" || $5 == \"/scratch\" {print $5, $9}' "
                   "/proc/self/mountinfo | sort")
    assert tmpfs.stdout == b"root:x:0:\n/etc tmpfs\n/scratch tmpfs\n"

    # Every capability podman grants (the host's bounding set).
    host_bounding = next(line.split()[1] for line in Path("/proc/self/status").read_text()
                         .splitlines() if line.startswith("CapBnd:"))
    privileged = podman("run", "--rm", "--network", "none", "--privileged", IMAGE, "sh", "-c",
                        "grep CapEff /proc/self/status")
    assert privileged.stdout == f"CapEff:\t{host_bounding}\n".encode()

    limits = podman("run", "--rm", "--network", "none", "--memory", "32m", "--pids-limit", "77",
                    IMAGE, "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max")
    assert limits.stdout == b"33554432\n77\n"


def test_podman_container_host_cgroup(podman: Podman) -> None:
    """podman gives cgroupsPath /libpod_parent/libpod-ID: the container's host processes are
    there, the VM's memory bounded, and the cgroup goes with the container."""
    from runv_py.sandbox import cgroup

    cid = podman("run", "-d", "--network", "none", "--memory", "32m", IMAGE, "sleep",
                 "600").stdout.decode().strip()
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", cid).stdout)
    path = f"/libpod_parent/libpod-{cid}"
    roots = cgroup.roots(cgroup.memberships())
    assert cgroup.memberships(pid)["memory"] == path
    from runv_py.sandbox import host_cgroup

    memory = int((roots["memory"] / path.lstrip("/") / "memory.limit_in_bytes").read_text())
    assert memory == (256 + 32 + host_cgroup.HOST_OVERHEAD_MIB
                      + host_cgroup.TCG_CODE_CACHE_MIB) << 20
    podman("rm", "--force", "--time", "0", cid)
    assert not (roots["memory"] / path.lstrip("/")).exists()


def test_podman_checkpoint_gets_runvs_reason(podman: Podman, tmp_path: Path) -> None:
    """podman checks for CRIU (Debian's criu), then calls `runv checkpoint --image-path
    --work-path [--leave-running]`: a podman container's rootfs is a host directory shared into
    the VM, so runv refuses with its reason, which podman passes on; the container runs on."""
    podman("run", "-d", "--name", "c1", "--network", "none", IMAGE, "sleep", "600")
    for extra in ((), ("--leave-running",), ("--export", str(tmp_path / "c1.tar"))):
        result = podman("container", "checkpoint", *extra, "c1", check=False)
        err = result.stderr.decode()
        assert result.returncode == 125, err
        assert "cannot be checkpointed: its rootfs is a host directory shared into the VM" \
            in err and "checkpoint --image-path" in err, err
    assert b"Up " in podman("ps").stdout
    assert podman("exec", "c1", "true").returncode == 0
    podman("rm", "--force", "--time", "0", "c1")
