"""bench/hyperctl: `hyperctl run --rm busybox true` end to end (image cached) against `runv run`
of the same bundle prepared beforehand, with the unpacked image as a read-only rootfs (so the
difference is what the image work adds: store lookup, bundle, writable overlay, records), and
against `podman run --rm` with runc on the same busybox image (a container without a VM), all
in the same run. crun is tried too: on these hosts it refuses the hybrid cgroup layout, and the
result says so.

    python bench/hyperctl.py [--n 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import RUNV, report, summary

from runv_py import config
from runv_py.sandbox.policy import ROOTFS_OVERLAY_ANNOTATION
from runv_py.workload.manager import WorkloadManager
from runv_py.workload.options import RunOptions
from tests.cli import image as archive

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")
IMAGE = "localhost/bench-busybox:latest"
PODMAN_CONF = ('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
               '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        code = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, check=False).returncode
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"{' '.join(argv[:4])}... exited {code}: "
                               f"{err.read().decode(errors='replace')[-600:]}")
    return time.monotonic() - start


def same_bundle(top: Path, env: dict[str, str]) -> Path:
    """The bundle hyperctl makes for `busybox true`, with the image's unpacked rootfs bound
    read-only instead of the overlay: what runv runs without any image work."""
    manager = WorkloadManager(config.load(), Path(env["HYPERCTL_ROOT"]),
                              Path(env["HYPERCTL_DATA_ROOT"]))
    workload = asyncio.run(manager.prepare(RunOptions(image="busybox", command=("true",),
                                                      rootfs="shared")))
    spec = json.loads((manager.records.bundle(workload.id) / "config.json").read_text())
    manager.records.remove(workload)
    overlay = json.loads(spec["annotations"].pop(ROOTFS_OVERLAY_ANNOTATION))
    spec["root"] = {"path": overlay["lower"][0], "readonly": True}
    bundle = top / "runv-bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def bench_vms(top: Path, n: int) -> dict[str, Any]:
    """hyperctl and runv alternate, so that load from elsewhere on the host hits both alike."""
    env = dict(os.environ, HYPERCTL_ROOT=str(top / "hc-run"),
               HYPERCTL_DATA_ROOT=str(top / "hc-data"))
    hyperctl = [HYPERCTL, "run", "--rm", "busybox", "true"]
    first = timed(hyperctl, env)  # creates and unpacks the image
    bundle = same_bundle(top, env)
    cached, runv = [], []
    for i in range(n):
        cached.append(timed(hyperctl, env))
        runv.append(timed([RUNV, "--root", str(top / "runv-root"), "run", "--bundle",
                           str(bundle), f"bench{i}"], env))
    return {"hyperctl": {"first_run_s": round(first, 4), "cached": summary(cached)},
            "runv": summary(runv)}


def bench_podman(top: Path, runtime: str, n: int) -> dict[str, Any] | str:
    if shutil.which("podman") is None or shutil.which(runtime) is None:
        return f"podman or {runtime} not installed"
    base = Path(tempfile.mkdtemp(prefix="pm-"))  # podman refuses a runroot over 50 bytes
    (base / "containers.conf").write_text(PODMAN_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(base / "containers.conf"))
    podman = ["podman", "--root", str(base / "storage"), "--runroot", str(base / "run"),
              "--tmpdir", str(base / "tmp"), "--storage-driver", "overlay",
              "--runtime", runtime]
    try:
        rootfs = top / "hc-data" / "images" / "rootfs"
        lower = next(p for p in rootfs.iterdir() if p.is_dir())
        tar = top / "busybox.tar"
        archive.build(lower, tar, IMAGE, ["sh"])
        timed([*podman, "load", "--input", str(tar)], env)
        run = [*podman, "run", "--rm", "--network", "none", IMAGE, "true"]
        try:
            timed(run, env)  # warm-up
        except RuntimeError as exc:
            return f"not usable here: {str(exc).strip()}"
        return summary([timed(run, env) for _ in range(n)])
    finally:
        subprocess.run([*podman, "system", "reset", "--force"], env=env, check=False,
                       stdin=subprocess.DEVNULL, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-hc-"))
    try:
        result: dict[str, Any] = {**bench_vms(top, args.n),
                                  "podman_runc": bench_podman(top, "runc", args.n),
                                  "podman_crun": bench_podman(top, "crun", 1)}
    finally:
        shutil.rmtree(top, ignore_errors=True)
    hc = result["hyperctl"]["cached"]["median"]
    ratios = {"hyperctl_over_runv": round(hc / result["runv"]["median"], 2),
              "image_overhead_s": round(hc - result["runv"]["median"], 4)}
    if isinstance(result["podman_runc"], dict):
        ratios["hyperctl_over_podman_runc"] = round(hc / result["podman_runc"]["median"], 2)
    result["ratios"] = ratios
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
