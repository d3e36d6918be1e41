"""The built-in `busybox` image, made locally from Debian's busybox-static (/bin/busybox) so
`hyperctl run busybox ...` needs no registry. The layer is an uncompressed tar with fixed
timestamps and owners, so the same busybox binary always gives the same image digest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import ImageError
from .model import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256_digest

BUSYBOX = Path("/bin/busybox")
NAME = "busybox:latest"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
                 "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o555,
         "root": 0o700, "run": 0o755, "sbin": 0o755, "sys": 0o555, "tmp": 0o1777,
         "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "var": 0o755, "var/tmp": 0o1777}
_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "busybox\n",
}


@dataclass(frozen=True, slots=True)
class BuiltImage:
    manifest: bytes
    config: bytes
    layer: bytes


def host_architecture() -> str:
    machine = os.uname().machine
    return ARCHITECTURES.get(machine, machine)


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, check=True,
                             timeout=30).stdout.decode()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"built-in busybox image: cannot run {busybox} --list-full ({exc}); "
                         "install Debian's busybox-static") from exc
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def layer_tar(busybox: Path = BUSYBOX) -> bytes:
    """The layer: directories, /bin/busybox, one symlink per applet, /etc basics."""
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise ImageError(f"built-in busybox image: cannot read {busybox} ({exc}); install "
                         "Debian's busybox-static") from exc
    applets = [a for a in _applets(busybox) if a != "bin/busybox"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = dict(_DIRS)
        for applet in applets:
            parent = applet.rpartition("/")[0]
            while parent and parent not in dirs:
                dirs[parent] = 0o755
                parent = parent.rpartition("/")[0]
        for d in sorted(dirs):
            tar.addfile(_info(d + "/", tarfile.DIRTYPE, dirs[d]))
        tar.addfile(_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)),
                    io.BytesIO(binary))
        for applet in applets:
            tar.addfile(_info(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox"))
        for name, text in sorted(_FILES.items()):
            data = text.encode()
            tar.addfile(_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build(busybox: Path = BUSYBOX) -> BuiltImage:
    layer = layer_tar(busybox)
    layer_digest = sha256_digest(layer)
    config = _canonical({
        "architecture": host_architecture(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [PATH_ENV], "Cmd": ["sh"],
                   "Labels": {"org.opencontainers.image.title": "busybox",
                              "org.runv-py.builtin": "busybox-static"}},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": f"runv-py built-in image from {busybox}"}],
    })
    manifest = _canonical({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
        "annotations": {"org.opencontainers.image.ref.name": NAME},
    })
    return BuiltImage(manifest, config, layer)
