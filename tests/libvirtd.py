"""A private libvirtd for tests and benchmarks: no system service, its own config, socket and
state. A root libvirtd reads /etc/libvirt and keeps its state in fixed places (/run/libvirt,
/var/lib/libvirt, ...), so it runs in a mount namespace of its own where a temporary directory
is bound over each of them; its socket is in that directory, where clients see it. It
daemonizes (its parent is init, not the test: libvirt's QEMUs are orphans, reaped by init; a
test process that is a child subreaper would adopt them and never reap them, and libvirtd
then waits for a zombie QEMU to die). The domain
user the QEMU driver resolves at start-up (Debian's libvirt-qemu, which only the
libvirt-daemon-system package would create) is in a private copy of /etc/passwd and
/etc/group bound in that namespace too.

    python -m tests.libvirtd serve TOP    # what start() runs inside `unshare --mount`
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
# libvirtd's fixed paths, each bound to a directory of the same name under the private top.
STATE_DIRS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
              "log": "/var/log/libvirt", "etc": "/etc/libvirt"}
QEMU_USER = "libvirt-qemu"
# runv-py's domains ask for root themselves (their DAC seclabel); user root here is for
# libvirtd's capability probes, which run as this user: as libvirt-qemu, libvirtd probed again
# mid-session and its probe QEMU hung, blocking every later createXML.
QEMU_CONF = """\
user = "root"
group = "root"
# QEMU's output to a file in the log directory (no virtlogd here)
stdio_handler = "file"
# root QEMU keeps its capabilities: it serves 9p shares with passthrough (files of any owner)
clear_emulator_capabilities = 0
"""


class PrivateLibvirtd:
    def __init__(self, top: Path | None = None) -> None:
        self.top = top or Path(tempfile.mkdtemp(prefix="runv-lv-"))
        self.socket = self.top / "sock" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.log = self.top / "libvirtd.log"
        self.pid_file = self.top / "libvirtd.pid"
        self.pid: int | None = None

    def _write_config(self) -> None:
        for name in (*STATE_DIRS, "sock"):
            (self.top / name).mkdir(parents=True, exist_ok=True)
        (self.top / "etc" / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.socket.parent}"\n'
            'unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'log_outputs = "3:stderr"\n')
        (self.top / "etc" / "qemu.conf").write_text(QEMU_CONF)
        for table, line in (("passwd", f"{QEMU_USER}:x:64055:64055::/var/lib/libvirt:"
                                       "/usr/sbin/nologin\n"),
                            ("group", f"{QEMU_USER}:x:64055:\n")):
            text = Path(f"/etc/{table}").read_text()
            if not any(row.startswith(f"{QEMU_USER}:") for row in text.splitlines()):
                text += line
            (self.top / table).write_text(text)

    def start(self, timeout_s: float = 60) -> PrivateLibvirtd:
        if shutil.which("libvirtd") is None:
            raise RuntimeError("libvirtd not found: `make deps` installs libvirt-daemon")
        self._write_config()
        with open(self.log, "ab") as out:
            # libvirtd --daemon returns once it serves (or failed to start).
            started = subprocess.run(
                ["unshare", "--mount", "--propagation", "slave", "--",
                 sys.executable, "-m", "tests.libvirtd", "serve", str(self.top)],
                cwd=TOP, stdout=out, stderr=out, stdin=subprocess.DEVNULL, timeout=timeout_s,
                check=False)
        with contextlib.suppress(OSError, ValueError):
            self.pid = int(self.pid_file.read_text())
        if started.returncode != 0 or self.virsh("version", check=False).returncode != 0:
            self.stop()
            raise RuntimeError(f"libvirtd did not come up: {self.log.read_text()[-2000:]}")
        return self

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
        return result

    def domains(self) -> dict[str, str]:
        """name -> state of every running domain, as `virsh list` shows them."""
        lines = self.virsh("list").stdout.splitlines()[2:]
        rows = [line.split(None, 2) for line in lines if line.strip()]
        return {row[1]: row[2].strip() for row in rows if len(row) == 3}

    def stop(self) -> None:
        """Destroy what domains are left (a stopping libvirtd leaves them running), stop the
        daemon, remove its directory."""
        if self.pid is not None and _alive(self.pid):
            for name in self.domains():
                self.virsh("destroy", name, check=False)
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(self.pid):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.1)
        shutil.rmtree(self.top, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (not our child: init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _serve(top: Path) -> None:
    """In the new mount namespace: bind the private directories over libvirtd's, then become
    libvirtd."""
    binds = [(top / name, Path(path)) for name, path in STATE_DIRS.items()]
    binds += [(top / "passwd", Path("/etc/passwd")), (top / "group", Path("/etc/group"))]
    for source, target in binds:
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    os.execvp("libvirtd", ["libvirtd", "--daemon", "--config", str(top / "etc" / "libvirtd.conf"),
                           "--pid-file", str(top / "libvirtd.pid")])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m tests.libvirtd serve TOP")
    _serve(Path(sys.argv[2]))
