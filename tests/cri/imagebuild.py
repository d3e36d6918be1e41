"""The images critest pulls, built offline and stored in a docker-registry storage tree.

Made from Debian packages (`apt-get download busybox nginx`, unpacked), programs of the host
(pgrep, ipcs and the shared libraries `ldd` names) and two small static C programs
(tests/cri/images). Each image stands in for an upstream one under the same name; what they
hold is what the specs use (docs/shim.md, Kubernetes):

- e2e-test-images/busybox:1.29-2: Debian's dynamic busybox, one hard link per applet (so that
  masking /bin/ls masks ls alone, and its shell runs /bin/ls rather than a built-in), procps'
  pgrep, util-linux's ipcs, and users root, nobody and www-data.
- e2e-test-images/nginx:1.14-2 and k8s-staging-cri-tools/hostnet-nginx-amd64: busybox plus
  Debian's nginx, serving a page on port 80 (12003 for the host-network one).
- e2e-test-images/httpd:2.4.39-4: busybox's httpd on port 80 behind a start script that logs
  the command line as Apache's httpd does ("Command line: 'httpd -D FOREGROUND'").
- e2e-test-images/nonewprivs:1.3: a set-user-ID root program printing its effective uid.
- pause:3.6: a static pause for the pod sandboxes.
- the k8s-staging-cri-tools test images: busybox with the USER, /etc/group or extra layer
  each spec asks for. The digest spec's image cannot be rebuilt (upstream's digest).

Usage: python3 -m tests.cri.imagebuild --inputs      (the package versions used: part of
                                                      the cache key)
       python3 -m tests.cri.imagebuild OUT           (OUT/registry, OUT/images.txt)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MTIME = 1_600_000_000
DEBS = ("busybox", "nginx")
HOST_PROGRAMS = ("/usr/bin/pgrep", "/usr/bin/ipcs")
K8S = "registry.k8s.io"
STAGING = "gcr.io/k8s-staging-cri-tools"
MIRRORED_HOSTS = ("registry.k8s.io", "gcr.io")

PASSWD = ("root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\nwww-data:x:33:\nusers:x:100:\nnogroup:x:65534:\n"

NGINX_CONF = """user nobody nogroup;
worker_processes 1;
pid /run/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log /dev/stdout;
    default_type text/html;
    server {{
        listen {port};
        location / {{ root /usr/share/nginx/html; index index.html; }}
    }}
}}
"""

HTTPD_FOREGROUND = """#!/bin/sh
# Apache's httpd logs its command line at start; this image's busybox httpd stands in for it.
echo "[core:notice] [pid $$] AH00094: Command line: 'httpd -D FOREGROUND'" >&2
exec httpd -f -v -p 80 -h /var/www
"""


@dataclass
class Tree:
    """A layer's entries by path, written in order (directories are made as needed)."""

    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=dict)

    def _info(self, path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path.strip("/"))
        info.type, info.mode, info.mtime = kind, mode, MTIME
        return info

    def directory(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.entries:
                self.entries[sub] = (self._info(sub, tarfile.DIRTYPE, mode if i == len(parts)
                                                else 0o755), None)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(path.strip("/")) or ".")
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.entries[info.name] = (info, data)

    def hardlink(self, path: str, target: str) -> None:
        self.directory(os.path.dirname(path.strip("/")))
        info = self._info(path, tarfile.LNKTYPE, 0o755)
        info.linkname = target.strip("/")
        self.entries[info.name] = (info, None)

    def symlink(self, path: str, target: str) -> None:
        self.directory(os.path.dirname(path.strip("/")))
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.entries[info.name] = (info, None)

    def host_file(self, path: str, mode: int = 0o755) -> None:
        self.file(path, Path(path).read_bytes(), mode)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, (info, data) in self.entries.items():
                if name == ".":
                    continue
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def shared_libraries(program: str) -> list[str]:
    """The libraries `ldd` resolves for program, and its ELF interpreter."""
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1:
            path = words[words.index("=>") + 1]
            if path.startswith("/"):
                found.append(path)
        elif words and words[0].startswith("/"):
            found.append(words[0])
    return found


def unpacked_debs(work: Path) -> Path:
    """busybox and nginx from Debian, downloaded and unpacked into work/debs."""
    debs = work / "debs"
    debs.mkdir()
    # As root into a directory of root's: no sandbox user for the download.
    download = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *DEBS]
    if subprocess.run(download, cwd=debs, check=False, stdout=subprocess.DEVNULL).returncode:
        # A machine whose package lists were cleaned after its packages were installed.
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(download, cwd=debs, check=True, stdout=subprocess.DEVNULL)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(debs / "root")], check=True)
    return debs / "root"


def static_program(source: Path, out: Path) -> bytes:
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(out), str(source)], check=True)
    return out.read_bytes()


def base_tree(debs: Path) -> Tree:
    tree = Tree()
    for path, mode in (("/tmp", 0o1777), ("/root", 0o700), ("/proc", 0o555), ("/sys", 0o555),
                       ("/dev", 0o755), ("/run", 0o755), ("/var/www", 0o755)):
        tree.directory(path, mode)
    tree.symlink("/var/run", "../run")
    tree.file("/bin/busybox", (debs / "bin/busybox").read_bytes(), 0o755)
    applets = subprocess.run([str(debs / "bin/busybox"), "--list-full"], capture_output=True,
                             text=True, check=True).stdout.split()
    for applet in applets:
        if "/" in applet and applet != "bin/busybox":
            tree.hardlink("/" + applet, "/bin/busybox")
    for program in HOST_PROGRAMS:
        tree.host_file(program)
    for program in (str(debs / "bin/busybox"), *HOST_PROGRAMS):
        for library in shared_libraries(program):
            tree.host_file(library)
    tree.file("/etc/passwd", PASSWD.encode())
    tree.file("/etc/group", GROUP.encode())
    tree.file("/var/www/index.html", b"<html><body>runv-py CRI test</body></html>\n")
    return tree


def nginx_tree(debs: Path, port: int) -> Tree:
    tree = Tree()
    tree.file("/usr/sbin/nginx", (debs / "usr/sbin/nginx").read_bytes(), 0o755)
    for library in shared_libraries(str(debs / "usr/sbin/nginx")):
        tree.host_file(library)
    tree.file("/etc/nginx/nginx.conf", NGINX_CONF.format(port=port).encode())
    tree.file("/usr/share/nginx/html/index.html", b"<html><body>nginx</body></html>\n")
    tree.directory("/var/lib/nginx")
    tree.directory("/var/log/nginx")
    return tree


def single_file_tree(path: str, data: bytes, mode: int = 0o644) -> Tree:
    tree = Tree()
    tree.file(path, data, mode)
    return tree


def blob(layout: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


@dataclass(frozen=True)
class Image:
    reference: str                  # as critest names it
    layers: tuple[str, ...]         # names of trees, lowest first
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    user: str = ""

    @property
    def repository_path(self) -> str:
        """The path under the local registry (the mirror of the reference's host)."""
        return self.reference.split("/", 1)[1].split("@")[0].rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.reference.rsplit(":", 1)[1]


def images() -> list[Image]:
    e2e = f"{K8S}/e2e-test-images"
    test_images = [Image(f"{STAGING}/test-image-{n}:latest", ("busybox", f"test-{n}"),
                         ("sh",)) for n in (1, 2, 3)]
    tags = [Image(f"{STAGING}/test-image-tags:{n}", ("busybox", "test-tags"), ("sh",))
            for n in (1, 2, 3)]
    return [
        Image(f"{e2e}/busybox:1.29-2", ("busybox",), ("sh",)),
        Image(f"{e2e}/nginx:1.14-2", ("busybox", "nginx"), ("nginx", "-g", "daemon off;")),
        Image(f"{e2e}/httpd:2.4.39-4", ("busybox", "httpd"), ("httpd-foreground",)),
        Image(f"{e2e}/nonewprivs:1.3", ("nonewprivs",), entrypoint=("/nnp",)),
        Image(f"{K8S}/pause:3.6", ("pause",), entrypoint=("/pause",)),
        Image(f"{STAGING}/hostnet-nginx-amd64:latest", ("busybox", "hostnet-nginx"),
              ("nginx", "-g", "daemon off;")),
        Image(f"{STAGING}/test-image-user-uid:latest", ("busybox",), ("sh",), user="1002"),
        Image(f"{STAGING}/test-image-user-username:latest", ("busybox",), ("sh",),
              user="www-data"),
        Image(f"{STAGING}/test-image-user-uid-group:latest", ("busybox",), ("sh",),
              user="1003:users"),
        Image(f"{STAGING}/test-image-user-username-group:latest", ("busybox",), ("sh",),
              user="www-data:www-data"),
        Image(f"{STAGING}/test-image-predefined-group:latest", ("busybox", "predefined-group"),
              ("sh",), user="1000"),
        Image(f"{STAGING}/test-image-latest:latest", ("busybox", "test-latest"), ("sh",)),
        Image(f"{STAGING}/test-image-tag:test", ("busybox", "test-tag"), ("sh",)),
        Image(f"{STAGING}/test-image-tag:all", ("busybox", "test-tag"), ("sh",)),
        *test_images, *tags,
    ]


def trees(debs: Path, work: Path) -> dict[str, Tree]:
    made = {
        "busybox": base_tree(debs),
        "nginx": nginx_tree(debs, 80),
        "hostnet-nginx": nginx_tree(debs, 12003),
        "httpd": single_file_tree("/usr/local/bin/httpd-foreground",
                                  HTTPD_FOREGROUND.encode(), 0o755),
        "nonewprivs": single_file_tree("/nnp", static_program(HERE / "images/nonewprivs.c",
                                                             work / "nnp"), 0o4755),
        "pause": single_file_tree("/pause", static_program(HERE / "images/pause.c",
                                                          work / "pause"), 0o755),
        "predefined-group": Tree(),
    }
    group = made["predefined-group"]
    group.file("/etc/passwd", (PASSWD + "default-user:x:1000:1000::/home/default-user:"
                               "/bin/sh\n").encode())
    group.file("/etc/group", (GROUP + "default-user:x:1000:\n"
                              "group-defined-in-image:x:50000:default-user\n").encode())
    group.directory("/home/default-user")
    for name in ("test-1", "test-2", "test-3", "test-tags", "test-latest", "test-tag"):
        made[name] = single_file_tree(f"/{name}", f"{name}\n".encode())
    return made


def write_layout(layout: Path, made: dict[str, Tree], wanted: list[Image]) -> None:
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layers: dict[str, tuple[dict[str, object], str]] = {}
    for name, tree in made.items():
        raw = tree.tar()
        packed = gzip.compress(raw, mtime=0)
        layers[name] = (blob(layout, packed, "application/vnd.oci.image.layer.v1.tar+gzip"),
                        "sha256:" + hashlib.sha256(raw).hexdigest())
    manifests = []
    for image in wanted:
        config: dict[str, object] = {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/"}
        if image.cmd:
            config["Cmd"] = list(image.cmd)
        if image.entrypoint:
            config["Entrypoint"] = list(image.entrypoint)
        if image.user:
            config["User"] = image.user
        config_blob = blob(layout, json.dumps({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layers[n][1] for n in image.layers]},
        }, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = blob(layout, json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_blob, "layers": [layers[n][0] for n in image.layers],
        }, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
        manifest["annotations"] = {"org.opencontainers.image.ref.name": image.reference}
        manifests.append(manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": manifests}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def registry_config(storage: Path, port: int, *, readonly: bool) -> str:
    return f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
  maintenance:
    uploadpurging:
      enabled: false
    readonly:
      enabled: {'true' if readonly else 'false'}
http:
  addr: 127.0.0.1:{port}
"""


def wait_for_registry(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not come up") from None
            time.sleep(0.1)


def push_all(layout: Path, storage: Path, wanted: list[Image], work: Path) -> None:
    """Into a docker-registry of our own, by skopeo: the storage tree is the registry's."""
    port = free_port()
    config = work / "registry.yml"
    config.write_text(registry_config(storage, port, readonly=False))
    with open(work / "registry.log", "wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                   stderr=log)
    try:
        wait_for_registry(port, process)
        for image in wanted:
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                            f"oci:{layout}:{image.reference}",
                            f"docker://127.0.0.1:{port}/{image.repository_path}:{image.tag}"],
                           check=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


def inputs() -> list[str]:
    """The versions the images are made from, for the cache key: the Debian packages
    apt-get download takes, and those of the host's pgrep, ipcs and C library (the images
    carry their own copies of the libraries, so a host update does not break a cached set)."""
    policy = subprocess.run(["apt-cache", "policy", *DEBS], capture_output=True, text=True,
                            check=True).stdout
    candidates = [line.strip() for line in policy.splitlines() if "Candidate:" in line]
    installed = subprocess.run(["dpkg-query", "-W", "libc6", "procps", "util-linux"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    return candidates + [line for line in installed if line]


def build(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="cri-images-"))
    try:
        debs = unpacked_debs(work)
        wanted = images()
        write_layout(work / "layout", trees(debs, work), wanted)
        storage = out / "registry"
        storage.mkdir(parents=True)
        push_all(work / "layout", storage, wanted, work)
        (out / "images.txt").write_text("".join(f"{i.reference}\n" for i in wanted))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--inputs", action="store_true")
    args = parser.parse_args()
    if args.inputs:
        print("\n".join(inputs()))
        return 0
    if args.out is None:
        parser.error("OUT is required")
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
