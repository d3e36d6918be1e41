"""bench/shim: containerd 1.6 driving runv-py through containerd-shim-runv-v2, in the same run as
the same containerd driving runc through io.containerd.runc.v2:

- `ctr run --rm` until the first output line (runv VM boot included), and the same for a pod's
  container (CRI annotations) into the running VM of its sandbox;
- `ctr task exec` of /bin/true into a running task (through each shim), and `runc exec` into a
  bundle on the host with no containerd in between (bench/exec's measurement). The baseline is
  runc: crun refuses this host's hybrid cgroup layout unless cgroups are turned off.

Target: exec through the runv shim <= 3x exec through the runc shim (`exec_runv_over_runc_shim`).

    python bench/shim.py [--n-run 3] [--n-exec 10] [--json FILE]
"""

from __future__ import annotations

import argparse
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

from bundle import make, report, summary
from exec import exec_times

from tests.cli.image import build
from tests.integration.conftest import Containerd

IMAGE = "docker.io/library/runvbench:latest"
RUNTIMES = {"runv-shim": ["--runtime", "io.containerd.runv.v2"],
            "runc-shim": ["--runtime", "io.containerd.runc.v2"]}
EXEC_TARGET = 3.0


def first_line(cd: Containerd, runtime: list[str], name: str) -> float:
    argv = ["ctr", "--address", cd.address, "--namespace", "runvtest", "run", "--rm",
            *runtime, IMAGE, name, "sh", "-c", "echo ready"]
    t = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - t
    proc.stdout.read()
    if proc.wait() != 0 or line != b"ready\n":
        raise RuntimeError(f"{name}: exit {proc.returncode}, first line {line!r}")
    return elapsed


def pod_first_line(cd: Containerd, n: int) -> dict[str, Any]:
    """`ctr run --rm` of a pod's container into the running VM of its sandbox container."""
    sandbox = ["--annotation", "io.kubernetes.cri.container-type=sandbox",
               "--annotation", "io.kubernetes.cri.sandbox-id=pod"]
    cd.ctr("run", "-d", *RUNTIMES["runv-shim"], *sandbox, IMAGE, "pod", "sleep", "3600")
    member = [*RUNTIMES["runv-shim"], "--annotation", "io.kubernetes.cri.container-type=container",
              "--annotation", "io.kubernetes.cri.sandbox-id=pod"]
    try:
        return summary([first_line(cd, member, f"pod-c{i}") for i in range(n)])
    finally:
        stop(cd, "pod")


def exec_latency(cd: Containerd, runtime: list[str], name: str, n: int) -> dict[str, Any]:
    cd.ctr("run", "-d", *runtime, IMAGE, name, "sleep", "3600")
    try:
        samples = []
        for i in range(n):
            t = time.monotonic()
            cd.ctr("task", "exec", "--exec-id", f"e{i}", name, "true")
            samples.append(time.monotonic() - t)
        return summary(samples)
    finally:
        stop(cd, name)


def stop(cd: Containerd, name: str) -> None:
    cd.ctr("task", "kill", "--signal", "SIGKILL", name, check=False)
    deadline = time.monotonic() + 60
    while (cd.ctr("task", "delete", name, check=False).returncode != 0
           and time.monotonic() < deadline):
        time.sleep(0.2)
    cd.ctr("container", "delete", name, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-run", type=int, default=3)
    parser.add_argument("--n-exec", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-shim-"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cd = Containerd(top, env)
    result: dict[str, Any] = {}
    try:
        bundle = make(top / "img", ["sh"])
        build(bundle / "rootfs", top / "image.tar", IMAGE, ["sh"])
        cd.ctr("image", "import", str(top / "image.tar"))
        for label, runtime in RUNTIMES.items():
            result[f"run_first_line_{label}"] = summary(
                [first_line(cd, runtime, f"r-{label}-{i}") for i in range(args.n_run)])
            result[f"exec_{label}"] = exec_latency(cd, runtime, f"x-{label}", args.n_exec)
        result["run_first_line_runv-pod-container"] = pod_first_line(cd, args.n_run)
        host = make(top / "host", ["sleep", "3600"])
        result["exec_runc_direct"] = exec_times("runc", top / "runc-root", host, args.n_exec)
        runv = result["exec_runv-shim"]["median"]
        for base, key in (("exec_runc-shim", "exec_runv_over_runc_shim"),
                          ("exec_runc_direct", "exec_runv_over_runc_direct")):
            if isinstance(result[base], dict):
                result[key] = round(runv / result[base]["median"], 1)
        result["exec_target_met"] = result["exec_runv_over_runc_shim"] <= EXEC_TARGET
        runc_run = result["run_first_line_runc-shim"]["median"]
        result["run_runv_over_runc"] = round(result["run_first_line_runv-shim"]["median"]
                                             / runc_run, 1)
        result["run_runv_pod_container_over_runc"] = round(
            result["run_first_line_runv-pod-container"]["median"] / runc_run, 1)
    finally:
        cd.close()
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
