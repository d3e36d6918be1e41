"""Fixtures for driving the `runv` CLI as containerd and podman do: subprocesses with a state
root and a runtime config of the test's own, and a check that nothing outlives the test."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runv_py.sandbox import vm_dir
from tests.vm.conftest import processes_mentioning

RUNV = str(Path(sys.executable).parent / "runv")
PR_SET_CHILD_SUBREAPER = 36


def base_spec(args: list[str]) -> dict[str, Any]:
    return {
        "ociVersion": "1.1.0",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "runvbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in
                                 ("pid", "network", "ipc", "uts", "mount", "cgroup")]},
    }


class Runv:
    """One state root and runtime config; runs `runv` like a container manager would."""

    def __init__(self, top: Path, rootfs: Path, hypervisor_toml: str = "") -> None:
        self.top = top
        self.root = top / "root"
        self.state = Path(tempfile.mkdtemp(prefix="runv-c-"))
        self.config = top / "config.toml"
        self.config.write_text(f'state_dir = "{self.state}"\n[hypervisor]\nboot_timeout_s = 90\n'
                               + hypervisor_toml)
        self.rootfs = rootfs
        self.env = dict(os.environ, RUNV_CONFIG=str(self.config))
        self.env.pop("NOTIFY_SOCKET", None)
        self._bundles = 0

    def bundle(self, args: list[str], edit: Any = None) -> Path:
        """A bundle whose rootfs is a private copy of the busybox rootfs."""
        self._bundles += 1
        path = self.top / f"bundle{self._bundles}"
        path.mkdir()
        shutil.copytree(self.rootfs, path / "rootfs", symlinks=True)
        spec = base_spec(args)
        if edit is not None:
            edit(spec)
        (path / "config.json").write_text(json.dumps(spec))
        return path

    def argv(self, *args: str) -> list[str]:
        return [RUNV, "--root", str(self.root), "--log", str(self.top / "log.json"),
                "--log-format", "json", *args]

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None,
                 timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """Output is captured through files, not pipes: a stand-in keeps the stdio that
        create and exec --detach hand it, so a pipe would not reach EOF when they exit."""
        if input is None and "stdin" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            kw.setdefault("stdout", out)
            kw.setdefault("stderr", err)
            result = subprocess.run(self.argv(*args), input=input, timeout=timeout,
                                    env=self.env, check=False, **kw)
            out.seek(0)
            err.seek(0)
            result.stdout, result.stderr = out.read(), err.read()
        if check and result.returncode != 0:
            raise AssertionError(f"runv {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), env=self.env, **kw)

    def state_of(self, cid: str) -> dict[str, Any]:
        return dict(json.loads(self("state", cid).stdout))

    def wait_status(self, cid: str, status: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while (current := self.state_of(cid)["status"]) != status:
            assert time.monotonic() < deadline, f"{cid} stayed {current}, wanted {status}"
            time.sleep(0.2)

    def sandbox_dir(self, cid: str) -> Path:
        """The VM directory of the sandbox container `cid` (through a pooled one's link)."""
        return vm_dir.path_for(self.state, self.root, cid).resolve()

    def supervisor_pid(self, cid: str) -> int:
        owner = vm_dir.owner(self.sandbox_dir(cid))
        assert owner is not None, f"{cid} has no supervisor"
        return owner[0]

    def leftovers(self) -> list[str]:
        found = processes_mentioning(str(self.root)) + processes_mentioning(str(self.state))
        for base in (self.root, self.state / "sandboxes", self.state / "shares"):
            if base.exists():
                found += [f"state: {p}" for p in base.iterdir()]
        return found


def reap(pid: int, timeout_s: float = 60) -> int:
    """Wait for a process that was reparented to us (we are a subreaper, like containerd's
    shim) and return its status as a shell shows it (128+N for signal N)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
        assert time.monotonic() < deadline, f"pid {pid} did not exit"
        time.sleep(0.05)


@contextlib.contextmanager
def tmpfs_at(path: Path) -> Iterator[Path]:
    """A tmpfs mounted at `path` now, in the test's (the host's) mount namespace: a mount
    younger than any supervisor started before, which such a supervisor does not see by path
    where `/` is private."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "late", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def late_binds(top: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Bind sources on a tmpfs mounted from here on: a directory (read-write, at /late) and a
    file (read-only, at /etc/late.txt). Yields the spec edit that adds them; the command
    LATE_CHECK prints what the container sees of them."""
    with tmpfs_at(top / "late") as late:
        (late / "dir").mkdir()
        (late / "dir" / "in.txt").write_text("late dir\n")
        (late / "file.txt").write_text("late file\n")

        def edit(spec: dict[str, Any]) -> None:
            spec["mounts"] += [
                {"destination": "/late", "type": "bind", "source": str(late / "dir"),
                 "options": ["rbind", "rw"]},
                {"destination": "/etc/late.txt", "type": "bind",
                 "source": str(late / "file.txt"), "options": ["bind", "ro"]}]
        yield edit


LATE_CHECK = ("cat /late/in.txt /etc/late.txt; echo out > /late/out.txt; "
              "echo no 2>/dev/null > /etc/late.txt || echo read-only")
LATE_SEEN = b"late dir\nlate file\nread-only\n"


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphaned stand-ins come back to the test process, as they do to containerd's shim.
    Afterwards the test process stops adopting and collects what it adopted, so later tests
    see orphans go to init as usual."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) == 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture
def runv(tmp_path: Path, busybox_rootfs: Path, assets_dir: Path, subreaper: None,
         hypervisor_toml: str) -> Iterator[Runv]:
    tool = Runv(tmp_path, busybox_rootfs, hypervisor_toml)
    tool.env["RUNV_ASSETS_DIR"] = str(assets_dir)
    yield tool
    for cid in (p.name for p in tool.root.iterdir()) if tool.root.exists() else ():
        tool("delete", "--force", cid, check=False)
    left = tool.leftovers()
    shutil.rmtree(tool.state, ignore_errors=True)
    assert not left, f"left behind: {left}"
