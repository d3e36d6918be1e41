"""bench/rootfs: a hyperctl container's root filesystem as disks (`--rootfs block`: the image as
an erofs, the writable layer an ext4, joined by overlayfs in the guest) against the shared
host directories over 9p (`--rootfs shared`), in the same run, interleaved so that the host's
load hits both alike:

- start: `hyperctl run --rm IMAGE true` end to end (image cached, template path);
- untar: a tree of many small files (a `node_modules`-like 5000 files) unpacked into the
  container's rootfs from a tmpfs, then `sync`;
- write: 128 MiB written sequentially to the rootfs with fsync;
- read: a 128 MiB file of the image read once (cold in the guest; the host's page cache is
  warm for both);

timed in the guest (/proc/uptime) except start.

    python bench/rootfs.py [--n 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import report, summary

from tests.cli import image as archive

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")
IMAGE = "localhost/bench-rootfs:latest"
BIG_MIB = 128
TREE_DIRS, TREE_FILES = 200, 25
SOURCES = ("block", "shared")
WORKLOAD = (
    "up() { cut -d' ' -f1 /proc/uptime; }; cp /bench/tree.tar /dev/shm/; "
    "a=$(up); mkdir /work && tar -x -f /dev/shm/tree.tar -C /work && sync; b=$(up); "
    f"dd if=/dev/zero of=/big bs=1M count={BIG_MIB} conv=fsync 2>/dev/null; c=$(up); "
    "cat /bench/big > /dev/null; d=$(up); echo $a $b $c $d")


def hyperctl(env: dict[str, str], *args: str) -> tuple[float, bytes]:
    start = time.monotonic()
    done = subprocess.run([HYPERCTL, *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"hyperctl {' '.join(args[:5])}... exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-600:]}")
    return time.monotonic() - start, done.stdout


def _tree_tar() -> bytes:
    """A tree of small files, as a package manager leaves behind (deterministic)."""
    rng = random.Random(22)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as out:
        for d in range(TREE_DIRS):
            for f in range(TREE_FILES):
                data = rng.randbytes(rng.randint(256, 8192))
                info = tarfile.TarInfo(f"pkg{d:03d}/lib/file{f:02d}.js")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_image(top: Path, env: dict[str, str]) -> None:
    """busybox plus /bench/tree.tar and /bench/big, loaded into the store."""
    hyperctl(env, "run", "--rm", "--rootfs", "shared", "busybox", "true")
    rootfs = Path(env["HYPERCTL_DATA_ROOT"]) / "images" / "rootfs"
    lower = next(p for p in rootfs.iterdir() if p.is_dir())
    tree = top / "image"
    shutil.copytree(lower, tree, symlinks=True)
    (tree / "bench").mkdir()
    (tree / "bench" / "tree.tar").write_bytes(_tree_tar())
    with open(tree / "bench" / "big", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
    tar = top / "image.tar"
    archive.build(tree, tar, IMAGE, ["sh"])
    hyperctl(env, "load", "-i", str(tar))
    shutil.rmtree(tree)
    tar.unlink()


def bench_rootfs(env: dict[str, str], n: int) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in SOURCES}
    for source in SOURCES:  # first runs: the erofs is made, templates exist
        hyperctl(env, "run", "--rm", "--rootfs", source, IMAGE, "true")
    for i in range(n):
        order = SOURCES if i % 2 == 0 else SOURCES[::-1]
        for source in order:
            start, _ = hyperctl(env, "run", "--rm", "--rootfs", source, IMAGE, "true")
            _, out = hyperctl(env, "run", "--rm", "--rootfs", source, IMAGE,
                              "sh", "-c", WORKLOAD)
            a, b, c, d = (float(x) for x in out.split())
            for name, value in (("start_s", start), ("untar_s", b - a), ("write_s", c - b),
                                ("read_s", d - c)):
                samples[source].setdefault(name, []).append(value)
    result: dict[str, Any] = {s: {k: summary(v) for k, v in samples[s].items()}
                              for s in SOURCES}
    result["block_over_shared"] = {
        k: round(result["block"][k]["median"] / result["shared"][k]["median"], 3)
        for k in samples["block"]}
    result["throughput_mib_s"] = {
        s: {k: round(BIG_MIB / result[s][f"{k}_s"]["median"], 1) for k in ("write", "read")}
        for s in SOURCES}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-rootfs-"))
    env = dict(os.environ, HYPERCTL_ROOT=str(top / "run"), HYPERCTL_DATA_ROOT=str(top / "data"))
    try:
        make_image(top, env)
        result = {"rootfs": bench_rootfs(env, args.n)}
    finally:
        subprocess.run([HYPERCTL, "rm", "-f", *_all(env)], env=env, capture_output=True,
                       check=False)
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


def _all(env: dict[str, str]) -> list[str]:
    done = subprocess.run([HYPERCTL, "ps", "-a", "-q"], env=env, capture_output=True,
                          check=False)
    return done.stdout.decode().split()


if __name__ == "__main__":
    sys.exit(main())
