"""The local image store: verified blobs by digest, names (refs) to manifest digests, and
unpacked root filesystems cached by chain id for use as read-only overlayfs lowerdirs.

Layout under the root (docs/images.md):
    blobs/sha256/<hex>   manifests, configs and layers, each checked against its digest
    refs.json            {"busybox:latest": "sha256:<manifest digest>", ...}, replaced atomically
    rootfs/<chain hex>/  unpacked images; a directory here is always complete (renamed into place)
    rootfs/<chain hex>.lock  held exclusively while unpacking, shared by users of the rootfs
    rootfs/<chain hex><suffix>  files made from an unpacked rootfs (derived(): the erofs
                         image of a block rootfs), renamed into place when complete
    tmp/                 partial downloads (resumable) and unpacks in progress
    refs.lock, gc.lock   flocks: refs edits; gc (exclusive) against pulls/loads/unpacks (shared)
    tenants/<t>/refs.json, refs.lock   a tenant's own names (a store opened with `tenant=`)

A store opened for a tenant names images in the tenant's own refs and also finds the shared
names (refs.json, the operator's), which it may use but not retag or remove; blobs and unpacked
rootfs are shared by everyone, so a layer is stored and unpacked once whoever pulled it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ImageError, ImageNotFound
from . import builtin
from .blobs import BlobStore
from .model import ConfigBlob, Image, Manifest, sha256_digest
from .progress import Progress
from .reference import Reference
from .unpack import LayerSource, UnpackLimits, unpack_layers

if TYPE_CHECKING:
    from .registry import Credentials

log = logging.getLogger(__name__)
_HEX_PREFIX = re.compile(r"^(?:sha256:)?[0-9a-f]{6,64}$")


def _tree_size(path: Path, seen: set[tuple[int, int]]) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ImageStore:
    """Images on this host. Every method is safe against other processes using the same root
    at the same time; a killed pull, load or unpack never leaves something counted complete."""

    def __init__(self, root: Path, *, limits: UnpackLimits | None = None,
                 tenant: str | None = None) -> None:
        self.root = Path(root)
        self.blobs = BlobStore(self.root)
        self.limits = limits or UnpackLimits()
        self.tenant = tenant
        # Where this store's own names live (the shared ones: refs.json at the root).
        self.refs_dir = self.root if tenant is None else self.root / "tenants" / tenant
        self._ready = False

    # -- plumbing ------------------------------------------------------------------------------

    def _setup(self) -> None:
        if not self._ready:
            try:
                # private by default, like /var/lib/docker: images may come from private
                # registries; the rootfs below are still usable by root (overlayfs, virtiofsd)
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.blobs.setup()
                (self.root / "rootfs").mkdir(exist_ok=True)
                self.refs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise ImageError(f"image store {self.root}: cannot create it ({exc})") from exc
            self._ready = True

    @contextlib.contextmanager
    def _flock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        self._setup()
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared) while blobs or rootfs are added, so gc cannot free them half-way."""
        return self._flock("gc.lock", shared=True)

    @staticmethod
    def _read_refs(path: Path) -> dict[str, str]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            refs = json.loads(data)
        except ValueError as exc:
            raise ImageError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(refs, dict):
            raise ImageError(f"{path}: expected a JSON object")
        return {str(k): str(v) for k, v in refs.items()}

    def _own_refs(self) -> dict[str, str]:
        """The names this store may change (a tenant's own, or the shared ones)."""
        return self._read_refs(self.refs_dir / "refs.json")

    def _shared_refs(self) -> dict[str, str]:
        """The operator's names, which a tenant's store finds but may not change."""
        return {} if self.tenant is None else self._read_refs(self.root / "refs.json")

    def _refs(self) -> dict[str, str]:
        """Every name this store finds: its own, then the shared ones."""
        return {**self._shared_refs(), **self._own_refs()}

    def _all_refs(self) -> list[dict[str, str]]:
        """The names of every tenant and the shared ones: what gc must keep."""
        found = [self._read_refs(self.root / "refs.json")]
        with contextlib.suppress(FileNotFoundError):
            for tenant_dir in sorted((self.root / "tenants").iterdir()):
                found.append(self._read_refs(tenant_dir / "refs.json"))
        return found

    def _edit_refs(self, changes: dict[str, str | None], *, shared: bool = False) -> None:
        directory = self.root if shared else self.refs_dir
        with self._flock(str((directory / "refs.lock").relative_to(self.root))):
            refs = self._read_refs(directory / "refs.json")
            for name, digest in changes.items():
                if digest is None:
                    refs.pop(name, None)
                else:
                    refs[name] = digest
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".refs.", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(refs, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, directory / "refs.json")

    def tag(self, name: str, digest: str) -> Image:
        """Point `name` at the stored manifest `digest` (which must be complete). A tenant's
        store may not retag a shared name (to the same manifest it is a no-op)."""
        name = Reference.parse(name).name
        image = self._image(name, digest)
        shared = self._shared_refs().get(name)
        if shared == digest:
            return image
        if shared is not None:
            raise ImageError(f"image name {name} is a shared image of this host: tenant "
                             f"{self.tenant} cannot retag it (use a name of its own)")
        self._edit_refs({name: digest})
        return image

    def _image(self, name: str, digest: str) -> Image:
        what = f"image {name} ({digest[:19]})"
        try:
            manifest_data = self.blobs.read(digest)
            manifest = Manifest.parse(manifest_data, f"{what} manifest")
            config = ConfigBlob.parse(self.blobs.read(manifest.config.digest), f"{what} config")
            size = (len(manifest_data) + manifest.config.size
                    + sum(self.blobs.size(layer.digest) for layer in manifest.layers))
        except FileNotFoundError as exc:
            raise ImageError(f"{what}: blob {Path(str(exc.filename)).name} is missing from "
                             f"{self.root}; pull or load the image again") from exc
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(f"{what}: the config lists {len(config.diff_ids)} diff_ids for "
                             f"{len(manifest.layers)} layers")
        return Image(name=name, digest=digest, id=manifest.config.digest, config=config.config,
                     layers=tuple(layer.digest for layer in manifest.layers), size=size,
                     created=config.created, architecture=config.architecture, os=config.os,
                     diff_ids=config.diff_ids)

    # -- queries -------------------------------------------------------------------------------

    def images(self) -> list[Image]:
        """Every named image, sorted by name (a damaged one is logged and left out)."""
        found = []
        for name, digest in sorted(self._refs().items()):
            try:
                found.append(self._image(name, digest))
            except ImageError as exc:
                log.warning("%s", exc)
        return found

    def get(self, ref: str) -> Image:
        """The image named `ref` (or whose id or manifest digest starts with it). `busybox`
        is built from the host's busybox-static on first use."""
        refs = self._refs()
        if _HEX_PREFIX.match(ref) and ":" not in ref.removeprefix("sha256:"):
            want = ref if ref.startswith("sha256:") else "sha256:" + ref
            for name, digest in sorted(refs.items()):
                image = self._image(name, digest)
                if image.id.startswith(want) or image.digest.startswith(want):
                    return image
        try:
            name = Reference.parse(ref).name
        except ImageError:
            if not _HEX_PREFIX.match(ref):
                raise
            name = ""
        if name in refs:
            return self._image(name, refs[name])
        if name == builtin.NAME:
            return self._add_builtin()
        raise ImageNotFound(f"image {ref!r} is not in the local store {self.root}: pull it "
                            f"(hyperctl pull {ref}) or load it from an archive (hyperctl load "
                            "FILE)")

    def _add_builtin(self) -> Image:
        built = builtin.build()
        with self.writing():
            self.blobs.put(built.layer)
            self.blobs.put(built.config)
            digest = self.blobs.put(built.manifest)
            log.info("created the built-in image %s (%s) from %s", builtin.NAME, digest,
                     builtin.BUSYBOX)
            image = self._image(builtin.NAME, digest)
            self._edit_refs({builtin.NAME: digest}, shared=True)
            return image

    def inspect(self, ref: str) -> dict[str, Any]:
        """`docker image inspect`-style details of one image, for `hyperctl image inspect`:
        the image's names, digests, sizes, and its config and manifest documents as stored."""
        image = self.get(ref)
        config = json.loads(self.blobs.read(image.id))
        return {
            "Id": image.id,
            "RepoTags": [n for n, d in sorted(self._refs().items()) if d == image.digest],
            "Digest": image.digest,
            "Created": image.created,
            "Architecture": image.architecture,
            "Os": image.os,
            "Size": image.size,
            "ChainId": image.chain_id,
            "Config": config.get("config") or {},
            "RootFS": config.get("rootfs") or {},
            "History": config.get("history") or [],
            "Manifest": json.loads(self.blobs.read(image.digest)),
        }

    def disk_usage(self) -> int:
        """Bytes used by blobs, unpacked rootfs and partial downloads (hard links once)."""
        seen: set[tuple[int, int]] = set()
        return sum(_tree_size(self.root / d, seen) for d in ("blobs", "rootfs", "tmp")
                   if (self.root / d).is_dir())

    # -- adding and removing ---------------------------------------------------------------------

    async def pull(self, ref: str, *, progress: Progress | None = None,
                   platform: str = "linux/amd64", insecure: bool = False,
                   ca_file: Path | None = None, credentials: Credentials | None = None) -> Image:
        """Fetch `ref` from its registry (OCI distribution API), verify every blob, and name it.

        `platform` (OS/ARCH[/VARIANT]) picks the manifest from an index. The registry is asked
        over HTTPS; plain HTTP is used for loopback registries without TLS and, with
        `insecure`, for any registry (which also skips certificate checks). `ca_file` adds a
        CA to trust. `credentials` answer basic-auth challenges and are given to the token
        server of bearer-auth registries; without them, anonymous tokens are asked for.
        Interrupted downloads resume on the next pull; a blob whose digest or size does not
        match raises DigestMismatch and is not kept."""
        from .registry import Puller

        self._setup()
        reference = Reference.parse(ref)
        if reference.name in self._shared_refs() and reference.name not in self._own_refs():
            raise ImageError(f"image name {reference.name} is a shared image of this host: "
                             f"tenant {self.tenant} cannot pull over it (run it as it is, or "
                             "pull it under a name of its own)")
        puller = Puller(self, reference, platform=platform, insecure=insecure, ca_file=ca_file,
                        credentials=credentials, progress=progress)
        digest = await puller.run()
        return self.tag(reference.name, digest)

    def load(self, archive: Path, *, progress: Progress | None = None,
             platform: str = "linux/amd64") -> list[Image]:
        """Add the images of an oci-archive tarball, a `docker save` tarball or an OCI image
        layout directory; returns them as named in the store."""
        from .archive import load

        self._setup()
        with self.writing():
            named = load(self.blobs, Path(archive), progress=progress, platform=platform)
            return [self.tag(name, digest) for name, digest in named]

    def remove(self, ref: str) -> list[str]:
        """Untag `ref` (a name, or an id/digest prefix: then every name of that image); the
        blobs stay until gc(). Returns the names removed."""
        refs = self._own_refs()
        try:
            names = [Reference.parse(ref).name]
        except ImageError:
            names = []
        if self.tenant is not None and not any(n in refs for n in names) and \
                any(n in self._shared_refs() for n in names):
            raise ImageError(f"image {names[0]} is a shared image of this host: tenant "
                             f"{self.tenant} cannot remove it")
        names = [n for n in names if n in refs]
        if not names and _HEX_PREFIX.match(ref):
            image = self.get(ref)
            names = [n for n, d in refs.items() if d == image.digest]
        if not names:
            raise ImageNotFound(f"image {ref!r} is not in the local store {self.root} "
                                "(hyperctl images lists what is)")
        self._edit_refs(dict.fromkeys(names))
        return names

    def gc(self, *, dry_run: bool = False) -> int:
        """Free blobs, unpacked rootfs and partial downloads no name uses; returns the bytes
        freed (with `dry_run`, the bytes it would free; nothing is removed). A rootfs whose
        lock a user holds (see `use()`) is kept."""
        freed = 0
        with self._flock("gc.lock"):
            keep_blobs: set[str] = set()
            keep_rootfs: set[str] = set()
            for name, digest in (item for refs in self._all_refs() for item in refs.items()):
                try:
                    image = self._image(name, digest)
                except ImageError as exc:
                    log.warning("gc: %s", exc)
                    keep_blobs.add(digest)
                    continue
                keep_blobs.update((digest, image.id, *image.layers))
                keep_rootfs.add(self._rootfs_key(image))
            for digest in self.blobs.digests():
                if digest not in keep_blobs:
                    path = self.blobs.path(digest)
                    freed += path.stat().st_size
                    if not dry_run:
                        path.unlink()
            for entry in list(self.blobs.tmp.iterdir()):
                freed += _tree_size(entry, set()) if entry.is_dir() else entry.stat().st_size
                if not dry_run:
                    _rmtree(entry) if entry.is_dir() else entry.unlink()
            rootfs_dir = self.root / "rootfs"
            for entry in list(rootfs_dir.iterdir()):
                key = entry.name.split(".", 1)[0].removesuffix("-trusted")
                if entry.suffix == ".lock" or key in keep_rootfs:
                    continue
                with self._try_lock(rootfs_dir / f"{entry.name}.lock") as free:
                    if free and entry.is_dir():
                        freed += _tree_size(entry, set())
                        if not dry_run:
                            _rmtree(entry)
                    elif free:
                        freed += entry.stat().st_blocks * 512
                        if not dry_run:
                            entry.unlink()
        return freed

    # -- unpacked root filesystems ---------------------------------------------------------------

    @staticmethod
    def _rootfs_key(image: Image) -> str:
        return (image.chain_id or sha256_digest(b""))[7:]

    @contextlib.contextmanager
    def _try_lock(self, path: Path) -> Iterator[bool]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def rootfs(self, image: Image, *, progress: Progress | None = None,
               trusted: bool = False) -> Path:
        """The image's unpacked root filesystem, unpacking it on first use. Use it read-only
        (an overlayfs lowerdir): it is shared by every container of the image. `trusted`
        allows device nodes in the layers."""
        self._setup()
        key = self._rootfs_key(image)
        rootfs_dir = self.root / "rootfs"
        plain = rootfs_dir / key
        if plain.is_dir():
            return plain
        final = rootfs_dir / f"{key}-trusted" if trusted else plain
        if final.is_dir():
            return final
        with self.writing(), self._flock(f"rootfs/{final.name}.lock"):
            if final.is_dir():
                return final
            tmp = Path(tempfile.mkdtemp(dir=self.blobs.tmp, prefix=f"rootfs-{key[:12]}-"))
            try:
                layers = [LayerSource(self.blobs.path(d), diff_id,
                                      f"{i + 1}/{len(image.layers)} of {image.name}")
                          for i, (d, diff_id) in enumerate(zip(image.layers, image.diff_ids,
                                                               strict=True))]
                unpack_layers(layers, tmp, trusted=trusted, limits=self.limits,
                              progress=progress)
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not final.is_dir():
                        raise
                    _rmtree(tmp)   # another process finished the same unpack first
            except BaseException:
                _rmtree(tmp)
                raise
        return final

    def derived(self, image: Image, suffix: str, build: Callable[[Path, Path], None], *,
                progress: Progress | None = None) -> Path:
        """A file made from the image's unpacked rootfs by `build(rootfs, target)` (e.g. its
        erofs image, suffix ".erofs"), made once per chain id and kept beside the rootfs
        (gc frees both together). Use it read-only: every container of the image shares it."""
        rootfs = self.rootfs(image, progress=progress)
        final = rootfs.with_name(rootfs.name + suffix)
        if final.is_file():
            return final
        with self.writing(), self._flock(f"rootfs/{final.name}.lock"):
            if final.is_file():
                return final
            fd, name = tempfile.mkstemp(dir=self.blobs.tmp, prefix=f"{final.name[:12]}-")
            os.close(fd)
            tmp = Path(name)
            try:
                tmp.unlink()
                build(rootfs, tmp)
                tmp.chmod(0o444)
                os.rename(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return final

    @contextlib.contextmanager
    def use(self, image: Image, *, progress: Progress | None = None,
            trusted: bool = False) -> Iterator[Path]:
        """The image's rootfs, protected from gc() for as long as the context is open (a
        shared flock on its lock file: hold it while a container runs on it)."""
        while True:
            path = self.rootfs(image, progress=progress, trusted=trusted)
            with self._flock(f"rootfs/{path.name}.lock", shared=True):
                if path.is_dir():   # else gc won the race between unpack and lock
                    yield path
                    return
