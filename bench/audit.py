"""bench/audit: what the process audit costs, paired in one run: the same hyperctl workloads
with the agent's proc connector reader (the default) and without it (`hyperstart.audit=0` on
the guest's command line), alternating, cold boots (no template: both modes boot the same way).

- start: `hyperctl run --rm busybox true`, wall time to exit;
- execs: the same container running EXECS execs of /bin/true in a loop; the per-exec cost is
  (execs - start) / EXECS;
- idle: a detached `sleep` container left alone for IDLE_S seconds: its QEMU's CPU time (what
  the guest's wakeups cost the host).

    python bench/audit.py [--n 3] [--execs 300] [--idle-s 20] [--json FILE]
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

from bundle import report, summary

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")
MODES = {"audit": "", "no-audit": "hyperstart.audit=0"}


class Mode:
    def __init__(self, top: Path, name: str, kernel_params: str) -> None:
        self.name = name
        self.top = top / name
        self.state = self.top / "state"
        self.top.mkdir(parents=True)
        config = self.top / "config.toml"
        config.write_text(f'state_dir = "{self.state}"\ntemplate = "off"\n[hypervisor]\n'
                          f'boot_timeout_s = 300\nkernel_params = "{kernel_params}"\n')
        self.env = dict(os.environ, RUNV_CONFIG=str(config),
                        HYPERCTL_ROOT=str(self.top / "root"),
                        HYPERCTL_DATA_ROOT=str(self.top / "data"))

    def run(self, *args: str) -> str:
        done = subprocess.run([HYPERCTL, *args], env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"hyperctl {' '.join(args[:3])}: {done.stderr.decode()[-600:]}")
        return done.stdout.decode()

    def timed(self, *args: str) -> float:
        start = time.monotonic()
        self.run(*args)
        return time.monotonic() - start

    def idle(self, seconds: float) -> float:
        """CPU seconds of the idle container's QEMU over `seconds`."""
        workload_id = self.run("run", "-d", "--name", "idle", "busybox", "sleep",
                               "3600").strip()
        try:
            pid = _qemu_of(workload_id)
            time.sleep(5)  # the container's start settles
            before = _cpu_s(pid)
            time.sleep(seconds)
            return _cpu_s(pid) - before
        finally:
            self.run("rm", "-f", "idle")


def _qemu_of(workload_id: str) -> int:
    """The QEMU child of the container's supervisor."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runv_py.sandbox.supervisor" in argv and workload_id.encode() in argv:
            for task in (proc / "task").iterdir():
                for child in (task / "children").read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().startswith("qemu"):
                        return int(child)
    raise RuntimeError(f"no QEMU for {workload_id}")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--execs", type=int, default=300)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    modes = [Mode(top, name, params) for name, params in MODES.items()]
    loop = f"i=0; while [ $i -lt {args.execs} ]; do /bin/true; i=$((i+1)); done"
    samples: dict[str, dict[str, list[float]]] = {m.name: {"start_s": [], "execs_s": [],
                                                          "idle_cpu_s": []} for m in modes}
    try:
        for m in modes:  # the image into each store, untimed
            m.run("run", "--rm", "busybox", "true")
        for i in range(args.n):
            for m in modes if i % 2 == 0 else reversed(modes):
                samples[m.name]["start_s"].append(m.timed("run", "--rm", "busybox", "true"))
                samples[m.name]["execs_s"].append(m.timed("run", "--rm", "busybox", "sh", "-c",
                                                          loop))
            for m in modes if i % 2 == 0 else reversed(modes):
                samples[m.name]["idle_cpu_s"].append(m.idle(args.idle_s))
    except RuntimeError as exc:  # a loaded host: report what was measured
        print(f"stopped early: {str(exc)[:300]}", file=sys.stderr)
    finally:
        for m in modes:
            subprocess.run([HYPERCTL, "rm", "-f", "idle"], env=m.env, capture_output=True,
                           check=False)
        shutil.rmtree(top, ignore_errors=True)
    result: dict[str, Any] = {"execs": args.execs, "idle_s": args.idle_s}
    for name, by_kind in samples.items():
        result[name] = {kind: summary(values) for kind, values in by_kind.items() if values}
        per_exec = [(e - s) / args.execs for e, s in zip(by_kind["execs_s"], by_kind["start_s"],
                                                         strict=False)]
        if per_exec:
            result[name]["per_exec_ms"] = summary([p * 1000 for p in per_exec])
    on, off = result["audit"], result["no-audit"]
    result["ratios"] = {
        kind: round(on[kind]["median"] / max(off[kind]["median"], 1e-3), 3)
        for kind in ("start_s", "per_exec_ms", "idle_cpu_s") if kind in on and kind in off}
    report(result, args.json)


if __name__ == "__main__":
    main()
