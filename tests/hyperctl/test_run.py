"""`hyperctl run` end to end in real VMs: output and exit status, the writable layer, --rm,
terminals and stdin, --read-only, --entrypoint, --timeout, loaded images."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import image as archive
from tests.hyperctl.conftest import HYPERCTL, Hyperctl

pytestmark = pytest.mark.vm


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.lstat().st_mtime_ns for p in path.rglob("*")}


def test_writable_layer_is_per_container_and_rm_leaves_the_image_untouched(
        hyperctl: Hyperctl) -> None:
    result = hyperctl("run", "--rootfs", "shared", "--name", "writer", "busybox", "sh", "-c",
                      "echo changed > /etc/passwd; echo new > /made; rm /bin/ls; "
                      "cat /made; exit 3", check=False)
    assert (result.returncode, result.stdout) == (3, b"new\n"), result.stderr
    info = hyperctl.inspect("writer")
    assert info["state"]["status"] == "exited" and info["state"]["exit_code"] == 3
    upper = Path(info["upper_dir"])
    assert (upper / "made").read_text() == "new\n"
    lower = next((hyperctl.data / "images" / "rootfs").glob("[0-9a-f]*[!k]"))
    before = _tree(lower)
    assert "root:x:0:0" in (lower / "etc" / "passwd").read_text()
    ps = hyperctl("ps", "-a").stdout.decode()
    assert "Exited (3)" in ps and "writer" in ps
    assert "writer" not in hyperctl("ps").stdout.decode()

    # A second container of the same image sees none of the first one's changes.
    result = hyperctl("run", "--rm", "busybox", "sh", "-c",
                      "test ! -e /made && grep -q root:x /etc/passwd && test -e /bin/ls")
    assert result.returncode == 0
    assert _tree(lower) == before
    assert hyperctl("ps", "-a", "-q").stdout.decode().split() == [info["id"][:12]]
    hyperctl("rm", "writer")
    assert not upper.exists()
    assert hyperctl("ps", "-a", "-q").stdout == b""


def test_terminal_and_stdin(hyperctl: Hyperctl) -> None:
    code, output = hyperctl.in_pty("run", "--rm", "-t", "busybox", "sh", "-c", "tty; exit 7")
    assert code == 7, output
    assert b"/dev/pts/" in output, output

    result = hyperctl("run", "--rm", "-i", "busybox", "sh", "-c", "tr a-z A-Z; exit 5",
                      input=b"from stdin\n", check=False)
    assert (result.returncode, result.stdout) == (5, b"FROM STDIN\n"), result.stderr


def test_read_only_root_and_entrypoint(hyperctl: Hyperctl) -> None:
    result = hyperctl("run", "--rm", "--read-only", "--entrypoint", "/bin/sh", "busybox",
                      "-c", "touch /x 2>&1; echo status $?", check=False)
    assert b"Read-only file system" in result.stdout, result
    assert result.stdout.endswith(b"status 1\n")


def test_a_command_that_cannot_run_exits_127_or_126_as_with_podman(hyperctl: Hyperctl) -> None:
    for args, code, why in ((["nosuch"], 127, b"exec nosuch: No such file or directory"),
                            (["-d", "busybox", "nosuch"], 127, b"No such file or directory"),
                            (["/etc/passwd"], 126, b"exec /etc/passwd: Permission denied")):
        argv = args if args[0] == "-d" else ["--rm", "busybox", *args]
        result = hyperctl("run", *argv, check=False)
        assert result.returncode == code and why in result.stderr, result
        errors = [line for line in result.stderr.splitlines() if b"error" in line]
        assert len(errors) == 1, result.stderr
    assert hyperctl("ps", "-a", "-q").stdout == b""  # -d removed it too


def test_timeout_kills_the_sandbox(hyperctl: Hyperctl) -> None:
    started = time.monotonic()
    result = hyperctl("run", "--name", "slow", "--timeout", "3s", "busybox", "sleep", "600",
                      check=False)
    assert result.returncode == 137, result.stderr
    assert time.monotonic() - started < 120
    assert b"ran longer than --timeout 3s and was killed" in result.stderr
    info = hyperctl.inspect("slow")
    assert info["state"]["timed_out"] is True and info["state"]["exit_code"] == 137
    assert "timeout" in hyperctl("ps", "-a").stdout.decode()


def test_loaded_image_runs_its_own_command_and_rmi(hyperctl: Hyperctl, busybox_rootfs: Path,
                                                   tmp_path: Path) -> None:
    tar = tmp_path / "img.tar"
    archive.build(busybox_rootfs, tar, "example.test/tools:1", ["sh", "-c", "echo from-cmd"])
    loaded = hyperctl("load", "-i", str(tar))
    assert b"Loaded image: example.test/tools:1" in loaded.stdout
    images = hyperctl("images").stdout.decode()
    assert "example.test/tools:1" in images
    assert hyperctl("run", "--rm", "example.test/tools:1").stdout == b"from-cmd\n"
    hyperctl("rmi", "example.test/tools:1")
    assert "example.test/tools" not in hyperctl("images").stdout.decode()
    result = hyperctl("rmi", "example.test/tools:1", check=False)
    assert result.returncode == 1 and b"not in the local store" in result.stderr


def test_killed_foreground_run_leaves_an_exited_container_that_rm_cleans(
        hyperctl: Hyperctl) -> None:
    proc = subprocess.Popen([HYPERCTL, "run", "--rm", "--name", "fg", "busybox", "sh", "-c",
                             "echo up; sleep 600"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=hyperctl.env)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"up\n"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert hyperctl("wait", "fg", timeout=120).stdout == b"137\n"
    assert "Exited (137)" in hyperctl("ps", "-a").stdout.decode()
    hyperctl("rm", "fg")
    assert hyperctl.leftovers() == []
