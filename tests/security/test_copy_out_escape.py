"""Sandbox.copy_out() against a hostile container: the archive comes from the container's own
`tar` (which the container may replace), so it is extracted with the image unpacker's rules
(never through a symlink, every write beneath the destination by openat2), without owners,
setuid bits, devices or links that lead out, and only up to a size cap."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py.api import Sandbox
from runv_py.errors import RunvError
from tests.hyperctl.conftest import Hyperctl

pytestmark = pytest.mark.vm

FAKE_TAR = "/usr/local/bin/tar"   # before busybox's /bin/tar in the default PATH


def _archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", mode: int = 0o644,
           uid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.uid = kind, link, mode, uid
    return info


def symlink_chain_past_path_max() -> bytes:
    """CVE-2025-4517's shape: directories with 247-character names, a one-letter symlink to
    each, a symlink whose path is longer than PATH_MAX pointing back to the top, and a symlink
    through it to the destination's parent. os.path.realpath stops resolving at PATH_MAX, so
    tarfile's data filter (Python < 3.11.13) judges both links to stay inside, and a file
    written through the last one lands outside."""
    long = "d" * 247
    steps = "abcdefghijklmnop"
    members, path = [], ""
    for step in steps:
        members.append((_entry(os.path.join(path, long), tarfile.DIRTYPE, mode=0o755), None))
        members.append((_entry(os.path.join(path, step), tarfile.SYMTYPE, link=long), None))
        path = os.path.join(path, long)
    far = os.path.join(*steps, "l" * 254)
    members.append((_entry(far, tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps))),
                    None))
    members.append((_entry("escape", tarfile.SYMTYPE, link=far + "/.."), None))
    members.append((_entry("escape/victim"), b"written outside\n"))
    return _archive(*members)


@pytest.fixture
def box(api_roots: Hyperctl) -> Iterator[Sandbox]:
    with Sandbox.create("busybox", timeout=900) as sandbox:
        sandbox.run(["mkdir", "-p", "/out", "/usr/local/bin"], check=True)
        sandbox.write_file("/out/real", b"real file\n")
        yield sandbox


def _serve_archive(box: Sandbox, archive: bytes, extra: str = "") -> None:
    """The container's `tar -c` now prints `archive` (then whatever `extra` prints)."""
    box.write_file("/evil.tar", archive)
    box.write_file(FAKE_TAR, f"#!/bin/sh\ncat /evil.tar\n{extra}\n".encode(), mode=0o755)


def test_copy_out_writes_nothing_outside_its_destination(box: Sandbox, tmp_path: Path) -> None:
    tmp_path = tmp_path / "copies"   # the hyperctl fixture's files are beside it
    tmp_path.mkdir()
    dest = tmp_path / "dest"
    _serve_archive(box, symlink_chain_past_path_max())
    with pytest.raises(RunvError, match="through symlinks"):
        box.copy_out("/out", dest)
    assert not (tmp_path / "victim").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]

    _serve_archive(box, _archive((_entry("up", tarfile.SYMTYPE, link=str(tmp_path)), None),
                                 (_entry("up/victim2"), b"x")))
    with pytest.raises(RunvError, match="up"):
        box.copy_out("/out", tmp_path / "dest2")
    assert not (tmp_path / "victim2").exists()

    _serve_archive(box, _archive((_entry("../victim3"), b"x")))
    with pytest.raises(RunvError, match=r"\.\."):
        box.copy_out("/out", tmp_path / "dest3")
    assert not (tmp_path / "victim3").exists()


def test_copy_out_makes_no_setuid_device_or_foreign_owned_files(box: Sandbox,
                                                                 tmp_path: Path) -> None:
    _serve_archive(box, _archive((_entry("suid", mode=0o6755, uid=0), b"#!/bin/sh\n"),
                                 (_entry("theirs", uid=4321), b"x")))
    box.copy_out("/out", tmp_path / "a")
    suid = (tmp_path / "a/suid").stat()
    assert not suid.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(suid.st_mode)
    assert (tmp_path / "a/theirs").stat().st_uid == os.getuid()

    node = _entry("console", tarfile.CHRTYPE)
    node.devmajor, node.devminor = 5, 1
    _serve_archive(box, _archive((node, None)))
    with pytest.raises(RunvError, match="console"):
        box.copy_out("/out", tmp_path / "b")
    assert not (tmp_path / "b/console").exists()

    _serve_archive(box, _archive((_entry("out", tarfile.SYMTYPE, link="/etc/shadow"), None)))
    with pytest.raises(RunvError, match="/etc/shadow"):
        box.copy_out("/out", tmp_path / "c")


def test_copy_out_is_capped(box: Sandbox, tmp_path: Path) -> None:
    """A container that streams forever costs the host the cap, not its memory or disk."""
    big = _entry("big")
    big.size = 1 << 30
    header = big.tobuf(tarfile.GNU_FORMAT)
    box.write_file("/evil.tar", header)
    box.write_file(FAKE_TAR, b"#!/bin/sh\ncat /evil.tar\nexec cat /dev/zero\n", mode=0o755)
    with pytest.raises(RunvError, match="more than 8388608 bytes"):
        box.copy_out("/out", tmp_path / "dir", max_bytes=8 << 20)
    box.write_file("/usr/local/bin/cat", b"#!/bin/sh\nexec /bin/cat /dev/zero\n", mode=0o755)
    with pytest.raises(RunvError, match="more than 8388608 bytes"):
        box.copy_out("/out/real", tmp_path / "file", max_bytes=8 << 20)
    assert not (tmp_path / "file").exists()
    # the sandbox still works after an aborted copy
    assert box.run(["/bin/cat", "/out/real"], check=True).stdout == b"real file\n"
