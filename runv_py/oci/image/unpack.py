"""Applying layer tarballs to a directory, OCI style (whiteouts, opaque directories, hard links,
xattrs, ownership, modes), refusing hostile content: absolute or `..` paths, writes through a
symlink, hard links that leave the layer's tree, device nodes unless the image is trusted, and
tar bombs (size and entry-count limits). A refused layer raises UnsafeLayer before anything is
created outside the target; the caller throws the half-filled target away. Archives a guest
made (Sandbox.copy_out) go through the same code with stricter rules (extract_foreign)."""

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

from ...errors import DigestMismatch, ImageError, UnsafeArchive, UnsafeLayer
from ...openat2 import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, STRICTLY_BENEATH, openat2
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
    """Applies tar entries to the tree at `root`. Every file operation names its target by a
    directory fd that openat2 reached beneath the root through no symlink, plus one path
    component, so nothing is created, changed or removed outside the root even if the tree
    changes under us. `foreign`: the archive was made in a guest and the result is for the
    host (Sandbox.copy_out): no whiteouts, owners, xattrs, setuid/setgid/sticky bits, device
    nodes or fifos, no absolute symlinks, and no symlink may resolve out of the root."""

    def __init__(self, root: Path, *, trusted: bool, limits: UnpackLimits,
                 foreign: bool = False) -> None:
        self.root = str(root)
        self.trusted = trusted and not foreign
        self.foreign = foreign
        self.limits = limits
        self.entries = 0
        self.bytes = 0
        self.is_root = os.geteuid() == 0
        self.dirs: set[str] = {""}     # relative paths known to be real directories
        self.layer_paths: set[str] = set()     # entries of the current layer
        self.layer_parents: set[str] = set()   # and their parent directories
        self.symlinks: list[tuple[str, str]] = []   # foreign: (path, target), checked last
        self.label = ""
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cached: tuple[str, int] | None = None   # the last directory fd, by path

    def close(self) -> None:
        self._forget_dir()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def refuse(self, name: str, why: str) -> UnsafeLayer:
        if self.foreign:
            return UnsafeArchive(f"{self.label}: entry {name!r}: {why}; extraction stopped")
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

    def _open_dir(self, rel: str, flags: int = os.O_PATH) -> int:
        return openat2(self.root_fd, rel or ".", flags | os.O_DIRECTORY, STRICTLY_BENEATH)

    def dir_fd(self, name: str, rel: str) -> int:
        """An fd of the directory `rel`, reached beneath the root through no symlink; valid
        until the next dir_fd() or removal of a directory."""
        if self._cached is not None and self._cached[0] == rel:
            return self._cached[1]
        self._forget_dir()
        try:
            fd = self._open_dir(rel)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR, errno.ENOENT):
                raise self.refuse(name, f"{rel!r} is not a directory beneath the root "
                                        f"({exc.strerror})") from None
            raise
        self._cached = (rel, fd)
        return fd

    def _forget_dir(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _lstat(self, name: str, rel: str) -> os.stat_result | None:
        parent, _, base = rel.rpartition("/")
        try:
            return os.stat(base, dir_fd=self.dir_fd(name, parent), follow_symlinks=False)
        except FileNotFoundError:
            return None

    def parent_dir(self, name: str, rel: str, *, create: bool) -> None:
        """Make sure every parent of `rel` is a real directory inside the root (never a
        symlink), creating missing ones if `create`."""
        parent = rel.rpartition("/")[0]
        if parent in self.dirs:
            return
        walked = ""
        for part in parent.split("/"):
            above, walked = walked, f"{walked}/{part}" if walked else part
            if walked in self.dirs:
                continue
            st = self._lstat(name, walked)
            if st is None:
                if not create:
                    raise self.refuse(name, f"its directory {walked!r} does not exist")
                os.mkdir(part, 0o755, dir_fd=self.dir_fd(name, above))
                self.dirs.add(walked)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self.refuse(name, f"{walked!r} is a symlink and nothing is written "
                                        "through symlinks")
            if not stat.S_ISDIR(st.st_mode):
                raise self.refuse(name, f"{walked!r} is not a directory")
            self.dirs.add(walked)

    def remove(self, name: str, rel: str) -> None:
        st = self._lstat(name, rel)
        if st is None:
            return
        parent, _, base = rel.rpartition("/")
        fd = self.dir_fd(name, parent)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=fd)
            self.dirs = {d for d in self.dirs if d != rel and not d.startswith(rel + "/")}
        else:
            os.unlink(base, dir_fd=fd)

    def opaque(self, name: str, dir_rel: str) -> None:
        """Hide everything lower layers put under `dir_rel`, keeping this layer's entries."""
        self.parent_dir(name, f"{dir_rel}/x" if dir_rel else "x", create=True)
        fd = self._open_dir(dir_rel, os.O_RDONLY)
        try:
            children = os.listdir(fd)
        finally:
            os.close(fd)
        for child in children:
            child_rel = f"{dir_rel}/{child}" if dir_rel else child
            if child_rel in self.layer_paths or child_rel in self.layer_parents:
                st = self._lstat(name, child_rel)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    self.opaque(name, child_rel)
            else:
                self.remove(name, child_rel)

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
                raise self.refuse(member.name, f"more than {self.limits.max_entries} entries "
                                               "(tar bomb?)")
            self.entry(tar, member)
        if self.foreign:
            self.check_links()

    def entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = self.clean(m.name)
        dir_rel, _, base = rel.rpartition("/")
        if not self.foreign and base == OPAQUE:
            self.opaque(m.name, dir_rel)
            return
        if not self.foreign and base.startswith(WHITEOUT):
            target = base[len(WHITEOUT):]
            if target in ("", ".", ".."):
                raise self.refuse(m.name, "whiteout of an invalid name")
            self.parent_dir(m.name, rel, create=True)
            self.remove(m.name, f"{dir_rel}/{target}" if dir_rel else target)
            return
        if not rel:
            if not m.isdir():
                raise self.refuse(m.name, "the root of a layer must be a directory")
            self.metadata(m, self.root_fd, ".", is_dir=True)
            return
        self.parent_dir(m.name, rel, create=True)
        self.mark(rel)
        if m.isdir():
            st = self._lstat(m.name, rel)
            if st is None or not stat.S_ISDIR(st.st_mode):
                self.remove(m.name, rel)
                os.mkdir(base, 0o700, dir_fd=self.dir_fd(m.name, dir_rel))
            self.dirs.add(rel)
            self.metadata(m, self.dir_fd(m.name, dir_rel), base, is_dir=True)
            return
        self.check_kind(m)
        self.remove(m.name, rel)
        fd = self.dir_fd(m.name, dir_rel)
        if m.isreg():
            self.bytes += m.size
            if self.bytes > self.limits.max_bytes:
                raise self.refuse(m.name, f"more than {self.limits.max_bytes} bytes of "
                                          "content (tar bomb?)")
            src = tar.extractfile(m)
            assert src is not None
            out_fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=fd)
            with os.fdopen(out_fd, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=fd)
            if self.foreign:
                self.symlinks.append((rel, m.linkname))
        elif m.islnk():
            self.hardlink(m, rel)
            return   # a hard link shares its target's inode and metadata
        elif m.isfifo():
            os.mkfifo(base, 0o600, dir_fd=fd)
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=fd)
        self.metadata(m, fd, base, is_dir=False)

    def check_kind(self, m: tarfile.TarInfo) -> None:
        if m.ischr() or m.isblk():
            if self.foreign:
                raise self.refuse(m.name, "device node")
            if not self.trusted:
                raise self.refuse(m.name, "device node in an untrusted image (pass "
                                          "trusted=True / --trusted to allow it)")
        elif self.foreign and m.isfifo():
            raise self.refuse(m.name, "fifo")
        elif self.foreign and m.issym() and m.linkname.startswith("/"):
            raise self.refuse(m.name, f"symlink to the absolute path {m.linkname!r}")
        elif not (m.isreg() or m.issym() or m.islnk() or m.isfifo()):
            raise self.refuse(m.name, f"unsupported tar entry type {m.type!r}")

    def hardlink(self, m: tarfile.TarInfo, rel: str) -> None:
        target = self.clean(m.linkname) if not m.linkname.startswith("/") else None
        if not target:
            raise self.refuse(m.name, f"hard link to {m.linkname!r} outside the layer's tree")
        self.parent_dir(m.name, target, create=False)
        target_dir, _, target_base = target.rpartition("/")
        st = self._lstat(m.name, target)
        if st is None:
            raise self.refuse(m.name, f"hard link to {m.linkname!r}, which does not exist")
        if stat.S_ISDIR(st.st_mode):
            raise self.refuse(m.name, f"hard link to the directory {m.linkname!r}")
        source_fd = self._open_dir(target_dir)
        try:
            dir_rel, _, base = rel.rpartition("/")
            os.link(target_base, base, src_dir_fd=source_fd,
                    dst_dir_fd=self.dir_fd(m.name, dir_rel), follow_symlinks=False)
        finally:
            os.close(source_fd)

    def metadata(self, m: tarfile.TarInfo, fd: int, name: str, *, is_dir: bool) -> None:
        """Owner, xattrs, mode and mtime of `name` in the directory `fd`."""
        link = m.issym()
        if self.is_root and not self.foreign:
            os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
        for key, value in m.pax_headers.items():
            if self.foreign or not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr."):]
            if not attr.startswith(XATTR_PREFIXES):
                log.debug("layer %s: %s: skipping xattr %s", self.label, m.name, attr)
                continue
            try:
                os.setxattr(f"/proc/self/fd/{fd}/{name}", attr,
                            value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.debug("layer %s: %s: xattr %s not set: %s", self.label, m.name, attr, exc)
        if not link:
            mode = m.mode & 0o7777
            if self.foreign:   # the host user's own files: no setuid/setgid/sticky
                mode = (m.mode & 0o755) | (0o700 if is_dir else 0o600)
            os.chmod(name, mode, dir_fd=fd, follow_symlinks=False)
        if not is_dir:
            os.utime(name, (m.mtime, m.mtime), dir_fd=fd, follow_symlinks=False)

    def check_links(self) -> None:
        """Every symlink of a foreign archive still resolves beneath the root (or nowhere):
        one leading out would hand whoever follows it later a host file."""
        for rel, target in self.symlinks:
            try:
                os.close(openat2(self.root_fd, rel, os.O_PATH,
                                 RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS))
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise self.refuse(rel, f"symlink to {target!r} leads out of the "
                                           "destination") from None


def unpack_layers(layers: Sequence[LayerSource], dest: Path, *, trusted: bool = False,
                  limits: UnpackLimits | None = None, progress: Progress | None = None) -> None:
    """Apply `layers` (bottom first) to the empty directory `dest`, checking each layer's
    uncompressed digest against its diff id."""
    unpacker = _Unpacker(dest, trusted=trusted, limits=limits or UnpackLimits())
    try:
        os.chmod(dest, 0o755)
        for i, layer in enumerate(layers):
            _apply_layer(unpacker, layer, layer.label or f"{i + 1}/{len(layers)} "
                                                      f"{layer.diff_id[7:19]}", progress)
    finally:
        unpacker.close()


def _apply_layer(unpacker: _Unpacker, layer: LayerSource, label: str,
                 progress: Progress | None) -> None:
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


def extract_foreign(stream: _Readable, dest: Path, label: str,
                    limits: UnpackLimits | None = None) -> None:
    """Apply a tar stream made in a guest (Sandbox.copy_out) to the directory `dest`, for the
    host: by the layer rules (nothing outside `dest`, never through a symlink) and the foreign
    ones of _Unpacker. Raises UnsafeArchive naming the entry; what was extracted before it
    stays in `dest`. The caller bounds the stream's length."""
    unpacker = _Unpacker(dest, trusted=False, limits=limits or UnpackLimits(), foreign=True)
    try:
        with tarfile.open(fileobj=_Reader(stream), mode="r|", bufsize=CHUNK,
                          tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
            unpacker.apply(tar, label)
    except UnsafeLayer as exc:
        if isinstance(exc, UnsafeArchive):
            raise
        raise UnsafeArchive(f"{label}: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise UnsafeArchive(f"{label}: not a valid tar stream ({exc})") from exc
    finally:
        unpacker.close()
