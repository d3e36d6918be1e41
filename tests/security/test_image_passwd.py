"""An image's etc/passwd and etc/group are read on the host (hyperctl --user NAME): they are
resolved inside the image's rootfs (a symlink cannot reach host files or devices), must be
regular files, and are read up to a bound. Each case runs in a child process with a memory
limit and a deadline, so the unbounded reads of the old code fail the test instead of the
machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
HOST_ONLY = "hostonly:x:4242:4242::/:/bin/sh\n"
CHILD = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from runv_py.errors import RunvError
from runv_py.workload.bundle import resolve_user
try:
    print(json.dumps({"ids": resolve_user(Path(sys.argv[1]), sys.argv[2], "--user")}))
except RunvError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def _resolve(root: Path, user: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(root), user], cwd=TOP,
                            capture_output=True, timeout=30, check=False,
                            env={**os.environ, "PYTHONPATH": str(TOP)})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def _rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\n")
    return root


def _symlink_to_host_file(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(HOST_ONLY)
    (root / "etc/passwd").symlink_to(outside / "passwd")


def _relative_escape(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(HOST_ONLY)
    (root / "etc/passwd").symlink_to("../../../../../../../../.." + str(outside / "passwd"))


def _etc_symlink(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(HOST_ONLY)
    (root / "etc/group").unlink()
    (root / "etc").rmdir()
    (root / "etc").symlink_to(outside)


CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "absolute symlink to a host file": (_symlink_to_host_file, "no user 'hostonly'"),
    "relative symlink out of the rootfs": (_relative_escape, "no user 'hostonly'"),
    "etc itself a symlink to a host dir": (_etc_symlink, "no user 'hostonly'"),
    "symlink to /dev/zero": (lambda t, r: (r / "etc/passwd").symlink_to("/dev/zero"),
                             "no user 'hostonly'"),
    "a fifo": (lambda t, r: os.mkfifo(r / "etc/passwd"), "not a regular file"),
    "a huge sparse file": (lambda t, r: os.truncate(_touch(r / "etc/passwd"), 2 << 30),
                           "larger than"),
}


def _touch(path: Path) -> Path:
    path.touch()
    return path


@pytest.mark.parametrize("case", CASES)
def test_image_user_lookup_stays_in_the_rootfs(tmp_path: Path, case: str) -> None:
    make, expected = CASES[case]
    root = _rootfs(tmp_path)
    make(tmp_path, root)
    answer = _resolve(root, "hostonly")
    assert "error" in answer and expected in str(answer["error"]), answer


def test_a_symlink_inside_the_rootfs_still_works(tmp_path: Path) -> None:
    """Images may link etc/passwd elsewhere in their own tree (resolved as the guest would)."""
    root = _rootfs(tmp_path)
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/passwd").write_text("app:x:1000:1001::/:/bin/sh\n")
    (root / "etc/passwd").symlink_to("/usr/share/passwd")
    assert _resolve(root, "app") == {"ids": [1000, 1001]}
