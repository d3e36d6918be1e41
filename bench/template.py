"""bench/template: starting sandboxes from a VM template against a cold boot, in the same run.

- `runv run` of a busybox bundle printing one line, to that line: template=auto (the template
  already built) against template=off (cold boot), and against the raw boot of the same kernel
  (bench/boot's floor). Targets: template / cold <= 0.25, template / floor <= 1.3. The clone
  path runs with the default agent channel (vsock, hot-plugged after restore) and with
  `channel = "serial"`: vsock / serial shows what the hot-plug costs.
- 10 clones started in parallel (GuestVm.boot, in one process): p99 / a single start, failures.
- Host memory of those 10 clones, idle: PSS per QEMU, and the share of each clone's resident
  guest RAM still shared with the template (not copied on write). Target >= 50%.
- The warm pool (`runv pool serve`, size 1): `runv run` to the first line when it takes a
  pooled VM, over the cold boot; with idle VMs paused and running: the CPU an idle pooled
  sandbox (supervisor + QEMU) uses, and the hand-over ("unpark") time.

    python bench/template.py [--n 5] [--floor-n 10] [--clones 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import floor_boot
from bundle import RUNV, make, report, summary
from start import median_phases, phases_of, pool_status, timed_run

from runv_py import config
from runv_py.sandbox.guest_vm import GuestVm, ensure_template


def runv_to_line(top: Path, bundle: Path, mode: str, n: int,
                 channel: str = "vsock") -> dict[str, Any]:
    cfg_file = top / f"config-{mode}-{channel}.toml"
    cfg_file.write_text(f'state_dir = "{top / "state"}"\ntemplate = "{mode}"\n'
                        f'[guest]\nchannel = "{channel}"\n')
    env = dict(os.environ, RUNV_CONFIG=str(cfg_file))
    line, total, paths, phases = [], [], [], []
    for i in range(n):
        argv = [RUNV, "--root", str(top / "root"), "--debug", "run", "--bundle", str(bundle),
                f"{mode}-{channel}{i}"]
        t_line, t_exit, out, err = timed_run(argv, env)
        assert out == b"bench-line\n", out
        line.append(t_line)
        total.append(t_exit)
        phases.append(phases_of(err))
        paths += re.findall(r"created \(([a-z-]+)", err)
    return {"to_line": summary(line), "paths": sorted(set(paths)),
            "phases_median_s": median_phases(phases, statistics.median(line),
                                             statistics.median(total))}


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def pool_to_line(top: Path, bundle: Path, idle: str, n: int) -> dict[str, Any]:
    cfg_file = top / f"config-pool-{idle}.toml"
    cfg_file.write_text(f'state_dir = "{top / ("state-pool-" + idle)}"\ntemplate = "auto"\n'
                        f'[pool]\nsize = 1\nidle = "{idle}"\n')
    env = dict(os.environ, RUNV_CONFIG=str(cfg_file))
    with open(top / f"pool-{idle}.log", "wb") as log:
        serve = subprocess.Popen([RUNV, "pool", "serve"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        member = next(m for m in pool_status(env)["members"] if m["state"] == "idle")
        pids = [member["pid"], member["qemu_pid"]]
        ticks, t0 = _cpu_ticks(pids), time.monotonic()
        time.sleep(10)
        cpu = (_cpu_ticks(pids) - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
        line, unpark = [], []
        for i in range(n):
            pool_status(env)
            argv = [RUNV, "--root", str(top / "root"), "--debug", "run", "--bundle",
                    str(bundle), f"pool-{idle}{i}"]
            t_line, _, out, err = timed_run(argv, env)
            assert out == b"bench-line\n" and "created (pool" in err, err[-500:]
            line.append(t_line)
            unpark += [int(ms) / 1000 for ms in re.findall(r"unpark (\d+) ms", err)]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
    return {"to_line": summary(line), "unpark_s": summary(unpark) if unpark else None,
            "idle_cpu_per_s": round(cpu, 4)}


def _mapping_of(pid: int, path: Path) -> dict[str, int]:
    """smaps counters (KiB) of the process's mapping of `path`."""
    counters: dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and line.endswith("kB\n"):
                counters[fields[0].rstrip(":")] = counters.get(fields[0].rstrip(":"), 0) \
                    + int(fields[1])
    return counters


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


async def clones(cfg: config.RuntimeConfig, count: int) -> dict[str, Any]:
    template = await ensure_template(cfg)
    t0 = time.monotonic()
    single = await GuestVm.boot(cfg)
    single_s = time.monotonic() - t0
    await single.close()

    async def timed() -> tuple[GuestVm, float]:
        start = time.monotonic()
        sandbox = await GuestVm.boot(cfg)
        return sandbox, time.monotonic() - start

    results = await asyncio.gather(*(timed() for _ in range(count)), return_exceptions=True)
    started = [r for r in results if isinstance(r, tuple)]
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    try:
        await asyncio.sleep(5)  # idle
        pss, shared = [], []
        for sandbox, _ in started:
            assert sandbox.machine is not None and sandbox.machine.pid is not None
            pid = sandbox.machine.pid
            pss.append(_pss_kib(pid))
            ram = _mapping_of(pid, template.memory)
            resident = ram.get("Rss", 0)
            copied = ram.get("Anonymous", 0)
            shared.append(1 - copied / resident if resident else 0.0)
        times = sorted(t for _, t in started)
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] if times else None
        paths = sorted({s.start_path for s, _ in started})
    finally:
        for sandbox, _ in started:
            await sandbox.close()
    return {
        "single_start_s": round(single_s, 4),
        "parallel": {"count": count, "failures": len(failures), "errors": failures[:3],
                     "start_s": summary(times) if times else None,
                     "p99_s": p99, "paths": paths},
        "p99_over_single": round(p99 / single_s, 2) if p99 else None,
        "idle_pss_kib_per_clone": summary([float(p) for p in pss]) if pss else None,
        "guest_ram_shared_with_template": summary(shared) if shared else None,
        "template_memory_file_on_disk_mib": template.memory.stat().st_blocks * 512 >> 20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--floor-n", type=int, default=10)
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--pool-n", type=int, help="runs from the warm pool (default --n)")
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = config.load(None)
    top = Path(tempfile.mkdtemp(prefix="bench-tmpl-"))
    try:
        bundle = make(top, ["echo", "bench-line"])
        # Warm-up: builds the templates `runv run` starts from, if there are none yet.
        runv_to_line(top, bundle, "auto", 1)
        runv_to_line(top, bundle, "auto", 1, channel="serial")
        floor = [asyncio.run(floor_boot(cfg)) for _ in range(args.floor_n)]
        cold = runv_to_line(top, bundle, "off", args.n)
        warm = runv_to_line(top, bundle, "auto", args.n)
        pooled = {idle: pool_to_line(top, bundle, idle, args.pool_n or args.n)
                  for idle in ("paused", "running")}
        # The clone path with the agent on virtio-serial instead of a hot-plugged vsock device.
        warm_serial = runv_to_line(top, bundle, "auto", args.n, channel="serial")
        state = top / "vms"
        many = asyncio.run(clones(replace(cfg, state_dir=state, template="auto"), args.clones))
        floor_median = statistics.median(floor)
        result: dict[str, Any] = {
            "floor_boot": summary(floor),
            "runv_run_cold": cold,
            "runv_run_template": warm,
            "runv_run_pool": pooled,
            "runv_run_template_serial": warm_serial,
            "clones": many,
            "ratios": {
                "template_over_cold": round(warm["to_line"]["median"]
                                            / cold["to_line"]["median"], 3),
                "template_serial_over_cold": round(warm_serial["to_line"]["median"]
                                                   / cold["to_line"]["median"], 3),
                "template_vsock_over_serial": round(warm["to_line"]["median"]
                                                    / warm_serial["to_line"]["median"], 3),
                "template_over_floor": round(warm["to_line"]["median"] / floor_median, 3),
                **{f"pool_{idle}_over_cold": round(pooled[idle]["to_line"]["median"]
                                                    / cold["to_line"]["median"], 3)
                   for idle in pooled},
                "parallel_p99_over_single": many["p99_over_single"],
            },
            "targets": {"template_over_cold": 0.25, "template_over_floor": 1.3,
                        "guest_ram_shared_with_template": 0.5},
        }
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
