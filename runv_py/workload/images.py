"""The images a workload runs: the one adapter between hyperctl and the OCI image store
(`runv_py.oci.image`), reduced to what running needs: an unpacked, read-only rootfs to use as
the overlay's lower layer and the image's run settings."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunvError


class ImageUnavailable(RunvError):
    """The image is not in the store and cannot be fetched."""

    grpc_code = "NOT_FOUND"
    reference = "image-not-found"


@dataclass(frozen=True, slots=True)
class ImageSettings:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    ref: str
    id: str
    rootfs: Path
    settings: ImageSettings


BUSYBOX = "/bin/busybox"


class Images:
    """The image store under `<data root>/images`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, ref: str) -> ResolvedImage:
        name = ref.removeprefix("docker.io/library/").removesuffix(":latest")
        if name != "busybox":
            raise ImageUnavailable(f"image {ref!r} is not in the store")
        rootfs = self.root / "busybox" / "rootfs"
        if not (rootfs / "bin" / "sh").exists():
            rootfs.parent.mkdir(parents=True, exist_ok=True)
            with open(rootfs.parent / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (rootfs / "bin" / "sh").exists():
                    self._build_busybox(rootfs)
        return ResolvedImage(ref="busybox", id="busybox", rootfs=rootfs,
                             settings=ImageSettings(cmd=("sh",), env=(
                                 "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                 "/sbin:/bin",)))

    def _build_busybox(self, rootfs: Path) -> None:
        tmp = rootfs.with_name("rootfs.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root", "var", "home"):
            (tmp / d).mkdir(parents=True)
        (tmp / "tmp").chmod(0o1777)
        shutil.copy(BUSYBOX, tmp / "bin" / "busybox")
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (tmp / "bin" / applet).symlink_to("busybox")
        (tmp / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                            "nobody:x:65534:65534:nobody:/home:/bin/false\n")
        (tmp / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
        tmp.rename(rootfs)
