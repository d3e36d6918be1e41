"""Layer unpacking: OCI semantics, and hostile layers refused with nothing written outside."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from runv_py.errors import DigestMismatch, ImageError, UnsafeLayer
from runv_py.oci.image.unpack import LayerSource, UnpackLimits, unpack_layers

from .builder import (
    device,
    digest,
    directory,
    fifo,
    file,
    hardlink,
    symlink,
    tar_layer,
)


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True,
                          timeout=60).stdout


def apply(tmp: Path, *layers: bytes, trusted: bool = False, gz: bool = False,
          zst: bool = False, limits: UnpackLimits | None = None) -> Path:
    root = tmp / "root"
    root.mkdir()
    sources = []
    for i, layer in enumerate(layers):
        blob = tmp / f"layer{i}"
        blob.write_bytes(gzip.compress(layer) if gz else zstd(layer) if zst else layer)
        sources.append(LayerSource(blob, digest(layer)))
    unpack_layers(sources, root, trusted=trusted, limits=limits)
    return root


def test_files_dirs_modes_owners_and_symlinks(tmp_path: Path) -> None:
    root = apply(tmp_path, tar_layer(
        directory("etc", 0o755),
        file("etc/hosts", b"127.0.0.1 localhost\n", 0o644),
        file("bin/su", b"#!", 0o4755),                  # parent created implicitly
        directory("tmp", 0o1777),
        file("home/u/secret", b"x", 0o600, uid=1000, gid=2000),
        symlink("bin/sh", "/bin/busybox"),
        fifo("run/fifo"),
    ), gz=True)
    assert (root / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert stat.S_IMODE((root / "bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    st = (root / "home/u/secret").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 2000, 0o600)
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


def test_whiteouts_remove_lower_files_and_dirs(tmp_path: Path) -> None:
    root = apply(tmp_path,
                 tar_layer(file("a/keep", b"1"), file("a/gone", b"2"), file("d/sub/x", b"3")),
                 tar_layer(file("a/.wh.gone"), file(".wh.d")))
    assert sorted(os.listdir(root / "a")) == ["keep"]
    assert not (root / "d").exists()


def test_opaque_dir_hides_lower_content_but_keeps_its_own(tmp_path: Path) -> None:
    root = apply(tmp_path,
                 tar_layer(file("d/old", b"1"), file("d/sub/old2", b"2"), file("e/old", b"3")),
                 tar_layer(directory("d"), file("d/.wh..wh..opq"), file("d/new", b"n"),
                           # marker after the layer's own entries: they must survive
                           file("e/sub/new", b"m"), file("e/.wh..wh..opq")))
    assert sorted(os.listdir(root / "d")) == ["new"]
    assert sorted(os.listdir(root / "e")) == ["sub"]
    assert (root / "e/sub/new").read_bytes() == b"m"


def test_replacing_file_by_dir_and_dir_by_file(tmp_path: Path) -> None:
    root = apply(tmp_path,
                 tar_layer(file("x", b"file"), file("y/inner", b"i")),
                 tar_layer(directory("x"), file("x/now-a-dir", b"d"), file("y", b"now a file")))
    assert (root / "x/now-a-dir").read_bytes() == b"d"
    assert (root / "y").read_bytes() == b"now a file"


def test_hard_links_share_the_inode(tmp_path: Path) -> None:
    root = apply(tmp_path, tar_layer(file("bin/busybox", b"elf", 0o755),
                                     hardlink("bin/ls", "bin/busybox")),
                 tar_layer(hardlink("sbin/init", "bin/busybox")))
    a, b, c = ((root / p).stat() for p in ("bin/busybox", "bin/ls", "sbin/init"))
    assert a.st_ino == b.st_ino == c.st_ino
    assert a.st_nlink == 3


def test_xattrs_user_and_security_kept_trusted_dropped(tmp_path: Path) -> None:
    root = apply(tmp_path, tar_layer(file("f", b"x", xattrs={
        "user.note": "hello", "trusted.overlay.opaque": "y"})))
    assert os.getxattr(root / "f", "user.note") == b"hello"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "f")


def test_zstd_layers(tmp_path: Path) -> None:
    root = apply(tmp_path, tar_layer(file("a/f", b"zstd content")),
                 tar_layer(file("a/.wh.f"), file("a/g", b"g")), zst=True)
    assert os.listdir(root / "a") == ["g"]
    (tmp_path / "bad").mkdir()
    blob = tmp_path / "bad.zst"
    blob.write_bytes(zstd(tar_layer(file("x", b"y" * 10_000)))[:-20])
    with pytest.raises(ImageError, match=r"zstd failed|not a valid tar stream"):
        unpack_layers([LayerSource(blob, digest(b""))], tmp_path / "bad")


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    blob = tmp_path / "layer"
    blob.write_bytes(tar_layer(file("f", b"x")))
    with pytest.raises(DigestMismatch, match="image config says"):
        unpack_layers([LayerSource(blob, digest(b"something else"))], tmp_path / "root")


def test_device_nodes_need_trust(tmp_path: Path) -> None:
    layer = tar_layer(device("dev/null", 1, 3))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UnsafeLayer, match="device node in an untrusted image"):
        apply(tmp_path / "a", layer)
    root = apply(tmp_path / "b", layer, trusted=True)
    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


# case -> (layers built for a given outside directory, what the error says)
HOSTILE: dict[str, tuple[Callable[[str], list[bytes]], str]] = {
    "dotdot": (lambda o: [tar_layer(file("../outside/pwned", b"x"))], "'..'"),
    "dotdot-inside": (lambda o: [tar_layer(file("a/../../outside/pwned", b"x"))], "'..'"),
    "absolute": (lambda o: [tar_layer(file(f"{o}/pwned", b"x"))], "absolute path"),
    "symlink-then-write": (lambda o: [tar_layer(symlink("link", "../outside"),
                                                file("link/pwned", b"x"))], "through symlinks"),
    "absolute-symlink-then-write": (lambda o: [tar_layer(symlink("etc", o),
                                                         file("etc/pwned", b"x"))],
                                    "through symlinks"),
    "symlink-in-lower-layer": (lambda o: [tar_layer(symlink("lib", o)),
                                          tar_layer(file("lib/pwned", b"x"))],
                               "through symlinks"),
    "symlink-then-mkdir": (lambda o: [tar_layer(symlink("d", o), directory("d/newdir"))],
                           "through symlinks"),
    "hardlink-dotdot": (lambda o: [tar_layer(hardlink("hl", "../outside/victim"))], "'..'"),
    "hardlink-absolute": (lambda o: [tar_layer(hardlink("hl", f"{o}/victim"))], "outside"),
    "hardlink-via-symlink": (lambda o: [tar_layer(symlink("d", o), hardlink("hl", "d/victim"))],
                             "through symlinks"),
    "whiteout-dotdot": (lambda o: [tar_layer(file("a/.wh..."))], "whiteout of an invalid name"),
    "whiteout-through-symlink": (lambda o: [tar_layer(symlink("d", o), file("d/.wh.victim"))],
                                 "through symlinks"),
    "opaque-through-symlink": (lambda o: [tar_layer(symlink("d", o),
                                                    file("d/.wh..wh..opq"))],
                               "through symlinks"),
    "root-as-symlink": (lambda o: [tar_layer(symlink("./", o), file("x", b"x"))],
                        "root of a layer must be a directory"),
    "huge-pax-header": (lambda o: [tar_layer(file("f", xattrs={"user.x": "x" * 2_000_000}))],
                        "header extension of"),
    "device": (lambda o: [tar_layer(device("dev/sda", 8, 0))], "device node"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_refused_and_nothing_written_outside(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    work = tmp_path / "work"
    work.mkdir()
    build, message = HOSTILE[case]
    with pytest.raises(UnsafeLayer, match=message) as err:
        apply(work, *build(str(outside)))
    assert "refusing" in str(err.value)
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "original"
    assert (outside / "victim").stat().st_nlink == 1
    assert sorted(os.listdir(tmp_path)) == ["outside", "work"]


def test_tar_bomb_entry_count_limit(tmp_path: Path) -> None:
    layer = tar_layer(*(file(f"f{i}") for i in range(50)))
    with pytest.raises(UnsafeLayer, match="more than 20 entries"):
        apply(tmp_path, layer, limits=UnpackLimits(max_entries=20))


def test_tar_bomb_size_limit_counts_all_layers(tmp_path: Path) -> None:
    layers = [tar_layer(file(f"big{i}", b"\0" * 600_000)) for i in range(2)]
    with pytest.raises(UnsafeLayer, match="more than 1000000 bytes"):
        apply(tmp_path, *layers, gz=True, limits=UnpackLimits(max_bytes=1_000_000))
