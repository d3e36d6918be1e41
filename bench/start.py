"""bench/start: a `runv run` of a busybox bundle printing one line, against the raw boot
of the same kernel (bench/boot's floor) and against runc and crun on the same bundle, all in
the same run, with the default config (a template clone). The runv time is split into the
phases of its own --debug timings, whichever start path it took.

    python bench/start.py [--n 5] [--floor-n 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import floor_boot
from bundle import RUNV, make, report, summary

from runv_py import config

# crun refuses these machines' hybrid cgroup layout unless it leaves cgroups alone.
OCI_FLAGS = {"crun": ("--cgroup-manager=disabled",)}
# runv --debug prints "created: supervisor_start 480 ms, prepare 5 ms, ..." and "started:
# start_container 600 ms".
_PHASE = re.compile(r"(\w+) (\d+) ms")
# The phases of either start path that are the host's work, not the guest's: a cold boot's
# prepare, a template start's template lookup, restore and vsock hot-plug.
HOST_PHASES = frozenset({"supervisor_start", "prepare", "template", "qemu", "restore", "vsock",
                         "cli_and_output", "teardown"})


def timed_run(argv: list[str], env: dict[str, str] | None = None
              ) -> tuple[float, float, bytes, str]:
    """(seconds to the first stdout line, seconds to exit, stdout, stderr)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    t_line = time.monotonic() - start
    rest = proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err[-800:]}")
    return t_line, time.monotonic() - start, first + rest, err


def bench_runv(top: Path, bundle: Path, n: int) -> dict[str, Any]:
    line, total, phases = [], [], []
    for i in range(n):
        argv = [RUNV, "--root", str(top / "runv-root"), "--debug", "run", "--bundle",
                str(bundle), f"bench{i}"]
        t_line, t_exit, out, err = timed_run(argv)
        assert out == b"bench-line\n", out
        line.append(t_line)
        total.append(t_exit)
        if phases_of(err):
            phases.append(phases_of(err))
    result = {"to_line": summary(line), "to_exit": summary(total)}
    if phases:
        result["phases_median_s"] = median_phases(phases, result["to_line"]["median"],
                                                  result["to_exit"]["median"])
    return result


def phases_of(err: str) -> dict[str, float]:
    """The phases (seconds) in a `runv --debug run`'s "created ..." and "started ..." lines."""
    return {name: int(ms) / 1000 for line in err.splitlines()
            if "created" in line or "started:" in line for name, ms in _PHASE.findall(line)}


def median_phases(phases: list[dict[str, float]], to_line: float, to_exit: float
                  ) -> dict[str, float]:
    """The median of each phase, and what they leave unaccounted (the CLI, the output)."""
    medians = {key: round(statistics.median(p.get(key, 0.0) for p in phases), 4)
               for key in phases[0]}
    medians["cli_and_output"] = round(to_line - sum(medians.values()), 4)
    medians["teardown"] = round(to_exit - to_line, 4)
    return medians


def bench_oci(binary: str, top: Path, bundle: Path, n: int) -> dict[str, Any] | str:
    if shutil.which(binary) is None:
        return f"{binary} not installed"
    line, total = [], []
    for i in range(n):
        argv = [binary, *OCI_FLAGS.get(binary, ()), "--root", str(top / f"{binary}-root"),
                "run", "--bundle", str(bundle), f"bench{i}"]
        try:
            t_line, t_exit, out, _ = timed_run(argv)
        except RuntimeError as exc:
            return f"not usable here: {str(exc).strip()}"
        assert out == b"bench-line\n", out
        line.append(t_line)
        total.append(t_exit)
    return {"to_line": summary(line), "to_exit": summary(total)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--floor-n", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = config.load(None)
    top = Path(tempfile.mkdtemp(prefix="bench-start-"))
    try:
        bundle = make(top, ["echo", "bench-line"])
        floor = [asyncio.run(floor_boot(cfg)) for _ in range(args.floor_n)]
        result: dict[str, Any] = {
            "floor_boot": summary(floor),
            "runv": bench_runv(top, bundle, args.n),
            "runc": bench_oci("runc", top, bundle, args.n),
            "crun": bench_oci("crun", top, bundle, args.n),
        }
        floor_median = result["floor_boot"]["median"]
        runv = result["runv"]
        result["ratios"] = {
            "runv_to_line_over_floor": round(runv["to_line"]["median"] / floor_median, 2),
            "runv_to_exit_over_floor": round(runv["to_exit"]["median"] / floor_median, 2),
        }
        phases = runv.get("phases_median_s", {})
        if phases:
            result["host_overhead_s"] = round(
                sum(v for k, v in phases.items() if k in HOST_PHASES), 4)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
