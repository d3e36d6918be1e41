"""bench/pull: pulling an image from a local registry (Debian's docker-registry on 127.0.0.1)
with runv-py's ImageStore against `skopeo copy` of the same image to an OCI layout, in the
same run; then unpacking it against `tar -xzf` of the same layers.

    python bench/pull.py [--n 5] [--mib 96] [--layers 3] [--json FILE]

Prints MB/s for each and the ratio runv-py / baseline (> 1: faster than the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runv_py.oci.image import ImageStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_layout(path: Path, mib: int, layers: int) -> list[Path]:
    """An OCI layout with `layers` gzip layers holding `mib` MiB of files in total: half
    random (incompressible), half text-like. Returns the layer blobs."""
    (path / "blobs/sha256").mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        (path / "blobs/sha256" / sha256(data)[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    descs, diff_ids, blobs = [], [], []
    per_layer = mib * 1024 * 1024 // layers
    for n in range(layers):
        tar_path = path.parent / f"layer{n}.tar"
        with tarfile.open(tar_path, "w") as tar:
            left, i = per_layer, 0
            while left > 0:
                size = min(left, 1 << 20)
                src = path.parent / "f"
                src.write_bytes(os.urandom(size) if i % 2 else (b"runv-py %d\n" % i) * (size // 10))
                tar.add(src, f"layer{n}/dir{i // 50}/file{i}")
                left -= size
                i += 1
        raw = tar_path.read_bytes()
        diff_ids.append(sha256(raw))
        packed = gzip.compress(raw, compresslevel=1, mtime=0)
        desc = blob(packed, "application/vnd.oci.image.layer.v1.tar+gzip")
        descs.append(desc)
        blobs.append(path / "blobs/sha256" / desc["digest"][7:])
        tar_path.unlink()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(config, "application/vnd.oci.image.config.v1+json"),
        "layers": descs}).encode()
    desc = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "bench"}
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return blobs


def start_registry(top: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (top / "registry").mkdir()
    config = top / "registry.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                      f"storage:\n  filesystem:\n    rootdirectory: {top / 'registry'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start") from None
            time.sleep(0.05)


def timed(fn: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.monotonic()
        fn()
        samples.append(time.monotonic() - t)
    return samples


def figure(samples: list[float], size: int) -> dict[str, float]:
    median = statistics.median(samples)
    return {"median_s": round(median, 3), "mb_per_s": round(size / median / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5, help="repetitions (median reported)")
    parser.add_argument("--mib", type=int, default=96, help="image content in MiB")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo", "tar"):
        if shutil.which(tool) is None:
            print(f"bench/pull: {tool} is not installed (make debian-deps)", file=sys.stderr)
            return 1
    top = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    registry, host = start_registry(top)
    try:
        blobs = build_layout(top / "layout", args.mib, args.layers)
        subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
                        f"oci:{top / 'layout'}:bench", f"docker://{host}/bench/image:1"],
                       check=True)
        ref = f"{host}/bench/image:1"
        size = sum(b.stat().st_size for b in blobs)
        counter = iter(range(10_000))

        def ours() -> None:
            store = ImageStore(top / f"store{next(counter)}")
            asyncio.run(store.pull(ref))

        def skopeo() -> None:
            dest = top / f"skopeo{next(counter)}"
            subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                            f"docker://{ref}", f"oci:{dest}:bench"], check=True)

        ours()      # warm-up: the registry's and the page cache's first reads
        skopeo()
        ours_s, skopeo_s = [], []
        for _ in range(args.n):   # interleaved, so load changes hit both alike
            ours_s += timed(ours, 1)
            skopeo_s += timed(skopeo, 1)
        pull_ours = figure(ours_s, size)
        pull_skopeo = figure(skopeo_s, size)
        for d in top.glob("skopeo*"):
            shutil.rmtree(d)

        store = ImageStore(top / "store0")
        for d in top.glob("store[1-9]*"):
            shutil.rmtree(d)
        image = store.images()[0]
        unpacked = 0

        def unpack_ours() -> None:
            nonlocal unpacked
            shutil.rmtree(top / "store0/rootfs")
            (top / "store0/rootfs").mkdir()
            path = store.rootfs(image)
            unpacked = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

        def unpack_tar() -> None:
            dest = top / "tar-rootfs"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for layer in image.layers:
                subprocess.run(["tar", "-xzf", str(store.blobs.path(layer)), "-C", str(dest)],
                               check=True)

        runv_u, tar_u = [], []
        for _ in range(args.n):
            runv_u += timed(unpack_ours, 1)
            tar_u += timed(unpack_tar, 1)
        unpack_runv = figure(runv_u, args.mib * 1024 * 1024)
        unpack_gnu = figure(tar_u, args.mib * 1024 * 1024)
        result = {
            "image": {"layers": args.layers, "content_mib": args.mib, "blob_bytes": size,
                      "unpacked_bytes": unpacked},
            "pull": {"runv_py": pull_ours, "skopeo_copy": pull_skopeo,
                     "ratio": round(pull_ours["mb_per_s"] / pull_skopeo["mb_per_s"], 2)},
            "unpack": {"runv_py": unpack_runv, "gnu_tar": unpack_gnu,
                       "ratio": round(unpack_runv["mb_per_s"] / unpack_gnu["mb_per_s"], 2)},
        }
        print(f"pull   {size / 1e6:.0f} MB: runv-py {pull_ours['mb_per_s']} MB/s, skopeo copy "
              f"{pull_skopeo['mb_per_s']} MB/s, ratio {result['pull']['ratio']}")
        print(f"unpack {args.mib} MiB: runv-py {unpack_runv['mb_per_s']} MB/s, tar -xzf "
              f"{unpack_gnu['mb_per_s']} MB/s, ratio {result['unpack']['ratio']}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        registry.send_signal(signal.SIGTERM)
        try:
            registry.wait(10)
        except subprocess.TimeoutExpired:
            registry.kill()
            registry.wait()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
