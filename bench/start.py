"""bench/start: a `runv run` of a busybox bundle printing one line, against the raw boot
of the same kernel (bench/boot's floor) and against runc and crun on the same bundle, all in
the same run, with the default config (a template clone). The runv time is split into the
phases of its own --debug timings, whichever start path it took. In the same run, over the
same floor:
- the cold boot (the bundle annotated `org.runv.template: off`);
- the warm pool: `runv pool serve` with the default `[pool]` config (in a state dir of its
  own), and once it is full, `--pool-n` runs back to back that do not wait for its refills:
  how many took a pooled VM, and their time to the line.

    python bench/start.py [--n 5] [--floor-n 10] [--pool-n 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
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


def bench_runv(top: Path, bundle: Path, n: int, name: str = "bench") -> dict[str, Any]:
    line, total, phases = [], [], []
    for i in range(n):
        argv = [RUNV, "--root", str(top / "runv-root"), "--debug", "run", "--bundle",
                str(bundle), f"{name}{i}"]
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


def pool_status(env: dict[str, str], idle: int = 1, timeout_s: float = 300) -> dict[str, Any]:
    """The pool's status once it holds `idle` idle VMs and starts none."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run([RUNV, "pool", "status", "--format", "json"], env=env,
                              capture_output=True, check=False)
        if done.returncode == 0:
            status: dict[str, Any] = json.loads(done.stdout)
            states = [m["state"] for m in status["members"]]
            if states.count("idle") >= idle and "starting" not in states:
                return status
        time.sleep(0.2)
    raise RuntimeError(f"the warm pool did not fill to {idle} idle VMs in {timeout_s:g} s")


def bench_pool(top: Path, bundle: Path, n: int) -> dict[str, Any]:
    """`n` runs back to back from a full pool of the default config, not waiting for refills."""
    cfg_file = top / "config-pool.toml"
    cfg_file.write_text(f'state_dir = "{top / "state-pool"}"\n')
    env = dict(os.environ, RUNV_CONFIG=str(cfg_file))
    with open(top / "pool.log", "wb") as log:
        serve = subprocess.Popen([RUNV, "pool", "serve"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    line, hits, misses = [], [], []
    try:
        pool_status(env, idle=config.load(str(cfg_file)).pool.size)
        for i in range(n):
            argv = [RUNV, "--root", str(top / "pool-root"), "--debug", "run", "--bundle",
                    str(bundle), f"pool{i}"]
            t_line, _, out, err = timed_run(argv, env)
            assert out == b"bench-line\n", out
            line.append(t_line)
            if "created (pool" in err:
                hits.append(t_line)
            else:
                why = re.findall(r"warm pool: not used \((.*?)\)", err)
                misses.append({"run": i, "why": why[0] if why else "?"})
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
    # How long each pooled VM took to become idle (the service logs it), the first ones too.
    ready = [float(t) for t in re.findall(r"pooled VM \S+ ready .*? in ([\d.]+)s",
                                          (top / "pool.log").read_text(errors="replace"))]
    return {"to_line": summary(line), "hits": len(hits), "misses": misses,
            "hit_to_line": summary(hits) if hits else None,
            "member_ready_s": summary(ready) if ready else None}


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
    parser.add_argument("--pool-n", type=int, default=20,
                        help="runs back to back from the warm pool (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = config.load(None)
    top = Path(tempfile.mkdtemp(prefix="bench-start-"))
    try:
        bundle = make(top, ["echo", "bench-line"])
        cold_bundle = make(top / "cold", ["echo", "bench-line"])
        spec = json.loads((cold_bundle / "config.json").read_text())
        spec["annotations"] = {"org.runv.template": "off"}
        (cold_bundle / "config.json").write_text(json.dumps(spec))
        floor = [asyncio.run(floor_boot(cfg)) for _ in range(args.floor_n)]
        result: dict[str, Any] = {
            "floor_boot": summary(floor),
            "runv": bench_runv(top, bundle, args.n),
            "runv_cold": bench_runv(top, cold_bundle, args.n, name="cold"),
            "runv_pool": bench_pool(top, bundle, args.pool_n) if args.pool_n else None,
            "runc": bench_oci("runc", top, bundle, args.n),
            "crun": bench_oci("crun", top, bundle, args.n),
        }
        floor_median = result["floor_boot"]["median"]
        runv = result["runv"]
        result["ratios"] = {
            "runv_to_line_over_floor": round(runv["to_line"]["median"] / floor_median, 2),
            "runv_to_exit_over_floor": round(runv["to_exit"]["median"] / floor_median, 2),
            "cold_to_line_over_floor": round(
                result["runv_cold"]["to_line"]["median"] / floor_median, 2),
        }
        pooled = result["runv_pool"]
        if pooled is not None:
            result["ratios"]["pool_to_line_over_floor"] = round(
                pooled["to_line"]["median"] / floor_median, 2)
            if pooled["hit_to_line"]:
                result["ratios"]["pool_hit_to_line_over_floor"] = round(
                    pooled["hit_to_line"]["median"] / floor_median, 2)
        runc = result["runc"]
        if isinstance(runc, dict):
            result["ratios"]["runv_to_line_over_runc"] = round(
                runv["to_line"]["median"] / runc["to_line"]["median"], 1)
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
