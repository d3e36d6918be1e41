"""Applying layer tarballs to a directory, OCI style (whiteouts, opaque directories, hard links,
xattrs, ownership, modes), refusing hostile content: absolute or `..` paths, writes through a
symlink, hard links that leave the layer's tree, device nodes unless the image is trusted, and
tar bombs (size and entry-count limits). A refused layer raises UnsafeLayer before anything is
created outside the target; the caller throws the half-filled target away."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...errors import DigestMismatch, ImageError, UnsafeLayer
from .progress import Progress, ProgressTask

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
# Only these xattr namespaces reach the rootfs: trusted.* (overlayfs' own metadata among them)
# would change how the cached rootfs behaves as an overlay lowerdir.
XATTR_PREFIXES = ("user.", "security.")


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """Bounds per image (all layers together): bytes of file content and tar entries."""

    max_bytes: int = 64 << 30
    max_entries: int = 2_000_000


@dataclass(frozen=True, slots=True)
class LayerSource:
    path: Path        # the blob, compressed or not
    diff_id: str      # sha256 of the uncompressed tar, from the image config
    label: str = ""   # for errors and progress


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Reader:
    """A read-only stream that counts (for progress) or hashes (for the diff id) what passes."""

    def __init__(self, inner: _Readable, task: ProgressTask | None = None,
                 digest: hashlib._Hash | None = None) -> None:
        self.inner = inner
        self.task = task
        self.digest = digest

    def read(self, size: int = -1, /) -> bytes:
        data = self.inner.read(size)
        if self.task is not None and data:
            self.task.advance(len(data))
        if self.digest is not None:
            self.digest.update(data)
        return data

    def seek(self, offset: int, /) -> int:
        raise io.UnsupportedOperation("layer streams are read once")

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


@contextlib.contextmanager
def _decompressed(path: Path, task: ProgressTask | None) -> Iterator[_Readable]:
    """The layer's tar stream: gzip in-process, zstd through zstd(1), else as stored."""
    with path.open("rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b":
            yield gzip.GzipFile(fileobj=_Reader(f, task), mode="rb")
        elif magic == b"\x28\xb5\x2f\xfd":
            yield from _zstd(path, task)
        else:
            yield _Reader(f, task)


def _zstd(path: Path, task: ProgressTask | None) -> Iterator[_Readable]:
    try:
        proc = subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise ImageError(f"layer {path.name} is zstd-compressed and zstd(1) cannot run "
                         f"({exc}); install Debian's zstd") from exc
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield proc.stdout
        proc.stdout.read()
        error = proc.stderr.read().decode(errors="replace").strip()
        if proc.wait() != 0:
            raise ImageError(f"layer {path.name}: zstd failed: {error}")
        if task:
            task.advance(path.stat().st_size)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


MAX_HEADER = 1 << 20


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax header or a GNU long name whole into memory before it returns the
    member: refuse big ones (no real layer needs a megabyte of path or xattrs)."""

    def _check(self) -> None:
        if self.size > MAX_HEADER:
            raise UnsafeLayer(f"a tar header extension of {self.size} bytes (more than "
                              f"{MAX_HEADER}); refusing the layer (tar bomb?)")

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check()
        return super()._proc_pax(tar)  # type: ignore[misc, no-any-return]

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check()
        return super()._proc_gnulong(tar)  # type: ignore[misc, no-any-return]


class _Unpacker:
    def __init__(self, root: Path, *, trusted: bool, limits: UnpackLimits) -> None:
        self.root = str(root)
        self.trusted = trusted
        self.limits = limits
        self.entries = 0
        self.bytes = 0
        self.is_root = os.geteuid() == 0
        self.dirs: set[str] = {""}     # relative paths known to be real directories
        self.layer_paths: set[str] = set()     # entries of the current layer
        self.layer_parents: set[str] = set()   # and their parent directories
        self.label = ""

    def refuse(self, name: str, why: str) -> UnsafeLayer:
        return UnsafeLayer(f"layer {self.label}: entry {name!r}: {why}; refusing the layer")

    def clean(self, name: str) -> str:
        """The entry's path relative to the root ("" for the root itself)."""
        if "\0" in name:
            raise self.refuse(name, "NUL in the path")
        if name.startswith("/"):
            raise self.refuse(name, "absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "'..' in the path leads outside the root")
        return "/".join(parts)

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def parent_dir(self, name: str, rel: str, *, create: bool) -> None:
        """Make sure every parent of `rel` is a real directory inside the root (never a
        symlink), creating missing ones if `create`."""
        parent = rel.rpartition("/")[0]
        if parent in self.dirs:
            return
        walked = ""
        for part in parent.split("/"):
            walked = f"{walked}/{part}" if walked else part
            if walked in self.dirs:
                continue
            path = self.abs(walked)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise self.refuse(name, f"its directory {walked!r} does not exist") from None
                os.mkdir(path, 0o755)
                self.dirs.add(walked)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self.refuse(name, f"{walked!r} is a symlink and layers may not write "
                                        "through symlinks")
            if not stat.S_ISDIR(st.st_mode):
                raise self.refuse(name, f"{walked!r} is not a directory")
            self.dirs.add(walked)

    def remove(self, rel: str) -> None:
        path = self.abs(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self.dirs = {d for d in self.dirs if d != rel and not d.startswith(rel + "/")}
        else:
            os.unlink(path)

    def opaque(self, name: str, dir_rel: str) -> None:
        """Hide everything lower layers put under `dir_rel`, keeping this layer's entries."""
        self.parent_dir(name, f"{dir_rel}/x" if dir_rel else "x", create=True)
        path = self.abs(dir_rel)
        for child in os.listdir(path):
            child_rel = f"{dir_rel}/{child}" if dir_rel else child
            if child_rel in self.layer_paths or child_rel in self.layer_parents:
                child_path = self.abs(child_rel)
                if os.path.isdir(child_path) and not os.path.islink(child_path):
                    self.opaque(name, child_rel)
            else:
                self.remove(child_rel)

    def mark(self, rel: str) -> None:
        self.layer_paths.add(rel)
        parent = rel.rpartition("/")[0]
        while parent and parent not in self.layer_parents:
            self.layer_parents.add(parent)
            parent = parent.rpartition("/")[0]

    def apply(self, tar: tarfile.TarFile, label: str) -> None:
        self.label = label
        self.layer_paths = set()
        self.layer_parents = set()
        for member in tar:
            self.entries += 1
            if self.entries > self.limits.max_entries:
                raise UnsafeLayer(f"layer {label}: more than {self.limits.max_entries} entries "
                                  "in the image; refusing it (tar bomb?)")
            self.entry(tar, member)

    def entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = self.clean(m.name)
        base = rel.rpartition("/")[2]
        dir_rel = rel.rpartition("/")[0]
        if base == OPAQUE:
            self.opaque(m.name, dir_rel)
            return
        if base.startswith(WHITEOUT):
            target = base[len(WHITEOUT):]
            if target in ("", ".", ".."):
                raise self.refuse(m.name, "whiteout of an invalid name")
            self.parent_dir(m.name, rel, create=True)
            self.remove(f"{dir_rel}/{target}" if dir_rel else target)
            return
        if not rel:
            if not m.isdir():
                raise self.refuse(m.name, "the root of a layer must be a directory")
            self.metadata(m, self.root, is_dir=True)
            return
        self.parent_dir(m.name, rel, create=True)
        path = self.abs(rel)
        self.mark(rel)
        if m.isdir():
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    self.remove(rel)
                    os.mkdir(path, 0o700)
            except FileNotFoundError:
                os.mkdir(path, 0o700)
            self.dirs.add(rel)
            self.metadata(m, path, is_dir=True)
            return
        if m.ischr() or m.isblk():
            if not self.trusted:
                raise self.refuse(m.name, "device node in an untrusted image (pass "
                                          "trusted=True / --trusted to allow it)")
        elif not (m.isreg() or m.issym() or m.islnk() or m.isfifo()):
            raise self.refuse(m.name, f"unsupported tar entry type {m.type!r}")
        self.remove(rel)
        if m.isreg():
            self.bytes += m.size
            if self.bytes > self.limits.max_bytes:
                raise UnsafeLayer(f"layer {self.label}: the image unpacks to more than "
                                  f"{self.limits.max_bytes} bytes; refusing it (tar bomb?)")
            src = tar.extractfile(m)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            self.hardlink(m, rel, path)
            return   # a hard link shares its target's inode and metadata
        elif m.isfifo():
            os.mkfifo(path, 0o600)
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        self.metadata(m, path, is_dir=False)

    def hardlink(self, m: tarfile.TarInfo, rel: str, path: str) -> None:
        target = self.clean(m.linkname) if not m.linkname.startswith("/") else None
        if not target:
            raise self.refuse(m.name, f"hard link to {m.linkname!r} outside the layer's tree")
        self.parent_dir(m.name, target, create=False)
        try:
            st = os.lstat(self.abs(target))
        except FileNotFoundError:
            raise self.refuse(m.name, f"hard link to {m.linkname!r}, which does not "
                                      "exist") from None
        if stat.S_ISDIR(st.st_mode):
            raise self.refuse(m.name, f"hard link to the directory {m.linkname!r}")
        os.link(self.abs(target), path, follow_symlinks=False)

    def metadata(self, m: tarfile.TarInfo, path: str, *, is_dir: bool) -> None:
        link = m.issym()
        if self.is_root:
            os.lchown(path, m.uid, m.gid)
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr."):]
            if not attr.startswith(XATTR_PREFIXES):
                log.debug("layer %s: %s: skipping xattr %s", self.label, m.name, attr)
                continue
            try:
                os.setxattr(path, attr, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.debug("layer %s: %s: xattr %s not set: %s", self.label, m.name, attr, exc)
        if not link:
            os.chmod(path, m.mode & 0o7777)
        if not is_dir:
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


def unpack_layers(layers: Sequence[LayerSource], dest: Path, *, trusted: bool = False,
                  limits: UnpackLimits | None = None, progress: Progress | None = None) -> None:
    """Apply `layers` (bottom first) to the empty directory `dest`, checking each layer's
    uncompressed digest against its diff id."""
    unpacker = _Unpacker(dest, trusted=trusted, limits=limits or UnpackLimits())
    os.chmod(dest, 0o755)
    for i, layer in enumerate(layers):
        label = layer.label or f"{i + 1}/{len(layers)} {layer.diff_id[7:19]}"
        task = progress.task(f"unpack {label}", layer.path.stat().st_size) if progress else None
        with _decompressed(layer.path, task) as stream:
            hashed = _Reader(stream, digest=hashlib.sha256())
            try:
                with tarfile.open(fileobj=hashed, mode="r|", bufsize=CHUNK,
                                  tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
                    unpacker.apply(tar, label)
                hashed.drain()
            except UnsafeLayer as exc:
                if str(exc).startswith("layer "):
                    raise
                raise UnsafeLayer(f"layer {label}: {exc}") from exc
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
                raise ImageError(f"layer {label}: not a valid tar stream ({exc})") from exc
        assert hashed.digest is not None
        actual = "sha256:" + hashed.digest.hexdigest()
        if actual != layer.diff_id:
            raise DigestMismatch(f"layer {label}: its content is {actual}, but the image "
                                 f"config says {layer.diff_id}")
        if task:
            task.finish("unpacked")

