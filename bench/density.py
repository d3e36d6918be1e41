"""bench/density: what an idle sandbox costs the host, with the default config.

N idle sandboxes (`hyperctl run -d busybox sleep ...`, N = 1 and 10 by default, 100 with
`--levels 1,10,100`). At each N, after the starts have settled:
- host memory per idle sandbox: the PSS of all its host processes (the monitor and everything
  under it), split by process kind: QEMU, supervisor, monitor, vsock keeper and worker,
  virtiofsd. PSS shares a page among the processes that map it, so a template's RAM pages
  that the clones still share count once in all;
- host CPU per idle sandbox: utime+stime (/proc/PID/stat) of its processes over a measured
  interval, as a percentage of one core;
- how long a new `hyperctl run --rm busybox true` takes with the N idle beside it, as a ratio
  against the same start with none (measured first, in the same run).
Once the sandboxes are gone, the baseline of each N: N bare VMs of the same size, kernel and
QEMU (bench/boot's floor initramfs, idle in a busybox sleep: no agent, no container, no host
process but QEMU), measured the same way: the sandboxes' memory is also printed as a ratio
against theirs, their idle CPU as points above theirs (a bare VM's is ~0).
Before the levels: `--burst` (10) `hyperctl run -d` started at once, the time until all have
returned as a ratio against one start alone, and their failures (then they are removed).

Everything it starts is removed at the end (`hyperctl rm -f`, then SIGKILL by pid for any
process of theirs still alive), also when interrupted.

    python bench/density.py [--levels 1,10] [--interval 10] [--settle 5] [--starts 3]
                            [--burst 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import start_floor
from bundle import report, summary

from runv_py import config

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")
CLK_TCK = os.sysconf("SC_CLK_TCK")
KINDS = ("qemu", "supervisor", "monitor", "vsock_keeper", "vsock_worker", "virtiofsd", "other")
IDLE_COMMAND = ("sleep", "1000000")
EXIT_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class HostProcess:
    pid: int
    kind: str


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return None


def _argv(pid: int) -> list[str]:
    raw = _read(f"/proc/{pid}/cmdline")
    return raw.rstrip("\0").split("\0") if raw else []


def _stat_fields(pid: int) -> list[str] | None:
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    # The command name (field 2) may hold spaces: the fields after it follow its ')'.
    return raw[raw.rindex(")") + 2:].split()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _kind(argv: list[str], parent_kind: str | None) -> str:
    if not argv:
        return "other"
    if os.path.basename(argv[0]).startswith("qemu-system"):
        return "qemu"
    if "virtiofsd" in os.path.basename(argv[0]):
        return "virtiofsd"
    words = set(argv[1:4])
    if "runv_py.sandbox.supervisor" in words:
        return "supervisor"
    if "runv_py.workload.monitor" in words:
        return "monitor"
    if "runv_py.vsock" in words:
        # The keeper forks the worker that serves the device.
        return "vsock_worker" if parent_kind in ("vsock_keeper", "vsock_worker") else \
            "vsock_keeper"
    return "other"


def sandbox_processes(data_root: Path, ids: Iterable[str]) -> dict[str, list[HostProcess]]:
    """Each container's host processes: its monitor (found by its argv: our data root and the
    container's id) and everything under it."""
    wanted = set(ids)
    monitors: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _argv(int(entry))
        if "runv_py.workload.monitor" not in argv[1:4] or str(data_root) not in argv:
            continue
        cid = argv[argv.index("--id") + 1] if "--id" in argv[:-1] else ""
        if cid in wanted:
            monitors[cid] = int(entry)
    children = _children()
    found: dict[str, list[HostProcess]] = {}
    for cid, monitor in monitors.items():
        procs: list[HostProcess] = []
        todo: list[tuple[int, str | None]] = [(monitor, None)]
        while todo:
            pid, parent_kind = todo.pop()
            kind = _kind(_argv(pid), parent_kind)
            procs.append(HostProcess(pid, kind))
            todo += [(child, kind) for child in children.get(pid, [])]
        found[cid] = procs
    return found


def pss_kib(pid: int) -> int:
    raw = _read(f"/proc/{pid}/smaps_rollup") or ""
    for line in raw.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def start_time(pid: int) -> int | None:
    """Its start time (stat field 22), None once it is gone (or a zombie)."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def cpu_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3.
    return None if fields is None else int(fields[11]) + int(fields[12])


def memory(sandboxes: dict[str, list[HostProcess]]) -> dict[str, Any]:
    """MiB per sandbox (mean over the sandboxes), in all and by process kind."""
    by_kind = {kind: 0.0 for kind in KINDS}
    counts = {kind: 0 for kind in KINDS}
    totals = []
    for procs in sandboxes.values():
        total = 0
        for proc in procs:
            kib = pss_kib(proc.pid)
            by_kind[proc.kind] += kib
            counts[proc.kind] += 1
            total += kib
        totals.append(total / 1024)
    n = max(1, len(sandboxes))
    return {"pss_mib_per_sandbox": summary(totals),
            "by_kind_mib": {k: round(v / 1024 / n, 2) for k, v in by_kind.items() if counts[k]},
            "processes_per_sandbox": {k: round(c / n, 2) for k, c in counts.items() if c}}


def idle_cpu(sandboxes: dict[str, list[HostProcess]], interval_s: float) -> dict[str, Any]:
    """Percent of one core each sandbox used over `interval_s`, in all and by kind."""
    before = {p.pid: cpu_ticks(p.pid) for procs in sandboxes.values() for p in procs}
    t0 = time.monotonic()
    time.sleep(interval_s)
    after = {pid: cpu_ticks(pid) for pid in before}
    elapsed = time.monotonic() - t0
    by_kind = {kind: 0.0 for kind in KINDS}
    per_sandbox = []
    for procs in sandboxes.values():
        used = 0.0
        for proc in procs:
            b, a = before[proc.pid], after[proc.pid]
            if a is None or b is None:
                continue
            pct = (a - b) / CLK_TCK / elapsed * 100
            by_kind[proc.kind] += pct
            used += pct
        per_sandbox.append(used)
    n = max(1, len(sandboxes))
    return {"interval_s": round(elapsed, 2),
            "pct_of_core_per_sandbox": summary(per_sandbox),
            "mean_pct_of_core_per_sandbox": round(sum(per_sandbox) / n, 3),
            "by_kind_pct": {k: round(v / n, 3) for k, v in by_kind.items() if v}}


class Fleet:
    """The idle sandboxes this run started, and their removal."""

    def __init__(self, top: Path) -> None:
        self.data_root = top / "data"
        self.env = dict(os.environ, HYPERCTL_ROOT=str(top / "run"),
                        HYPERCTL_DATA_ROOT=str(self.data_root))
        self.ids: list[str] = []
        # pid -> (its start time, its kind): a pid seen once is ours only while its start time
        # is the same.
        self.pids: dict[int, tuple[int, str]] = {}

    def hyperctl(self, *args: str) -> str:
        # stdout through a file too: a detached container's monitor keeps what it inherits.
        with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
            code = subprocess.run([HYPERCTL, *args], env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=err, check=False).returncode
            out.seek(0)
            err.seek(0)
            if code != 0:
                raise RuntimeError(f"hyperctl {' '.join(args[:3])} exited {code}: "
                                   f"{err.read().decode(errors='replace')[-600:]}")
            return out.read().decode()

    def timed_start(self) -> float:
        start = time.monotonic()
        self.hyperctl("run", "--rm", "busybox", "true")
        return time.monotonic() - start

    def grow(self, n: int) -> None:
        while len(self.ids) < n:
            cid = self.hyperctl("run", "-d", "busybox", *IDLE_COMMAND).strip().splitlines()[-1]
            self.ids.append(cid)
            print(f"[bench/density] {len(self.ids)}/{n} idle", file=sys.stderr)

    def burst(self, n: int) -> dict[str, Any]:
        """`n` idle sandboxes started at once: the time until every `hyperctl run -d` has
        returned, and the failures."""
        def one(_: int) -> str | RuntimeError:
            try:
                return self.hyperctl("run", "-d", "busybox", *IDLE_COMMAND).strip() \
                    .splitlines()[-1]
            except RuntimeError as exc:
                return exc

        start = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(one, range(n)))
        elapsed = time.monotonic() - start
        self.ids += [o for o in outcomes if isinstance(o, str)]
        return {"n": n, "all_returned_s": round(elapsed, 3),
                "failures": [str(o)[-300:] for o in outcomes if not isinstance(o, str)]}

    def processes(self) -> dict[str, list[HostProcess]]:
        found = sandbox_processes(self.data_root, self.ids)
        missing = set(self.ids) - set(found)
        if missing:
            raise RuntimeError(f"no host processes for {sorted(missing)}: did they exit?")
        self._remember(found)
        return found

    def _remember(self, found: dict[str, list[HostProcess]]) -> None:
        for procs in found.values():
            for proc in procs:
                started = start_time(proc.pid)
                if started is not None:
                    self.pids[proc.pid] = (started, proc.kind)

    def remove(self) -> list[str]:
        """Remove every sandbox; the processes of theirs that outlived `hyperctl rm` by
        EXIT_GRACE_S, killed ("kind pid")."""
        if self.ids:
            with tempfile.TemporaryFile() as sink:
                for at in range(0, len(self.ids), 20):
                    subprocess.run([HYPERCTL, "rm", "-f", *self.ids[at:at + 20]], env=self.env,
                                   stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                                   check=False)
        self._remember(sandbox_processes(self.data_root, self.ids))
        deadline = time.monotonic() + EXIT_GRACE_S
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = []
        for pid, (_, kind) in sorted(self._alive().items()):
            survivors.append(f"{kind} {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.ids, self.pids = [], {}
        return survivors

    def _alive(self) -> dict[int, tuple[int, str]]:
        return {pid: seen for pid, seen in self.pids.items() if start_time(pid) == seen[0]}


async def bare_vms(n: int, settle_s: float, interval_s: float) -> dict[str, Any]:
    """N bare idle VMs (the floor kernel and initramfs, the default sandbox's size): memory
    and idle CPU per VM, as for the sandboxes."""
    cfg = config.load(None)
    top = Path(tempfile.mkdtemp(prefix="bench-density-bare-"))
    machines = []
    try:
        for i in range(n):
            state = top / str(i)
            state.mkdir()
            machine, _ = await start_floor(cfg, state, idle=True)
            machines.append(machine)
        await asyncio.sleep(settle_s)
        vms = {str(i): [HostProcess(m.pid, "qemu")] for i, m in enumerate(machines)
               if m.pid is not None}
        cpu = await asyncio.to_thread(idle_cpu, vms, interval_s)
        return {"idle_cpu": cpu, "memory": memory(vms)}
    finally:
        for machine in machines:
            await machine.close()
        shutil.rmtree(top, ignore_errors=True)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, top: Path) -> dict[str, Any]:
    fleet = Fleet(top)
    result: dict[str, Any] = {"levels": {}}
    killed: list[str] = []
    try:
        fleet.timed_start()  # the built-in image and the template, made if missing
        alone = [fleet.timed_start() for _ in range(args.starts)]
        if args.burst:
            burst = fleet.burst(args.burst)
            burst["over_one_start_alone"] = round(
                burst["all_returned_s"] / statistics.median(alone), 2)
            result["burst"] = burst
            killed += fleet.remove()
        levels: dict[int, tuple[dict[str, Any], dict[str, Any], list[float]]] = {}
        for level in args.levels:
            fleet.grow(level)
            time.sleep(args.settle)
            cpu = idle_cpu(fleet.processes(), args.interval)
            mem = memory(fleet.processes())
            levels[level] = (cpu, mem, [fleet.timed_start() for _ in range(args.starts)])
        killed += fleet.remove()
        # Starts alone before and after the idle ones: load from elsewhere on the host moves
        # the baseline during the run.
        alone += [fleet.timed_start() for _ in range(args.starts)]
        result["new_start_alone_s"] = summary(alone)
        for level, (cpu, mem, starts) in levels.items():
            bare = asyncio.run(bare_vms(level, args.settle, args.interval))
            result["levels"][str(level)] = {
                "idle_cpu": cpu, "memory": mem, "new_start_s": summary(starts),
                "new_start_ratio": round(statistics.median(starts)
                                         / result["new_start_alone_s"]["median"], 2),
                "bare_vm": bare,
                "memory_over_bare_vm": round(
                    mem["pss_mib_per_sandbox"]["median"]
                    / bare["memory"]["pss_mib_per_sandbox"]["median"], 2),
                "idle_cpu_above_bare_vm_pct": round(
                    cpu["mean_pct_of_core_per_sandbox"]
                    - bare["idle_cpu"]["mean_pct_of_core_per_sandbox"], 3)}
    finally:
        if fleet.ids:
            killed += fleet.remove()
    result["killed_after_rm"] = killed
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"bench/density  new start alone: {result['new_start_alone_s']['median']:.3f} s")
    if "burst" in result:
        burst = result["burst"]
        print(f"  {burst['n']} started at once: all returned in {burst['all_returned_s']:.1f} s "
              f"= {burst['over_one_start_alone']:.1f}x one start alone, "
              f"{len(burst['failures'])} failed")
    for level, row in result["levels"].items():
        mem, cpu = row["memory"], row["idle_cpu"]
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in mem["by_kind_mib"].items())
        print(f"  N={level:<4} memory {mem['pss_mib_per_sandbox']['median']:.1f} MiB/sandbox "
              f"({kinds})")
        cpu_kinds = ", ".join(f"{k} {v:.2f}" for k, v in cpu["by_kind_pct"].items())
        print(f"         idle CPU {cpu['mean_pct_of_core_per_sandbox']:.2f}% of a core/sandbox "
              f"({cpu_kinds or 'none'})")
        print(f"         new start {row['new_start_s']['median']:.3f} s = "
              f"{row['new_start_ratio']:.2f}x alone")
        bare = row["bare_vm"]
        print(f"         {level} bare idle VMs: "
              f"{bare['memory']['pss_mib_per_sandbox']['median']:.1f} MiB/VM "
              f"(sandbox {row['memory_over_bare_vm']}x), idle CPU "
              f"{bare['idle_cpu']['mean_pct_of_core_per_sandbox']:.3f}% of a core/VM "
              f"(sandbox {row['idle_cpu_above_bare_vm_pct']:+.2f} points)")
    if result["killed_after_rm"]:
        print(f"  killed after hyperctl rm: {result['killed_after_rm']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,10",
                        help="idle sandbox counts, ascending (e.g. 1,10,100)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds of idle CPU measured at each level")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the last start before measuring")
    parser.add_argument("--starts", type=int, default=3,
                        help="timed `run --rm true` starts alone and at each level")
    parser.add_argument("--burst", type=int, default=10,
                        help="sandboxes started at once before the levels (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.levels = sorted({int(n) for n in args.levels.split(",")})
    if not args.levels or args.levels[0] < 1:
        parser.error("--levels: positive counts, e.g. 1,10")
    signal.signal(signal.SIGTERM, _interrupted)
    top = Path(tempfile.mkdtemp(prefix="bench-density-"))
    try:
        result = run(args, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    _print(result)
    return 1 if result["killed_after_rm"] else 0


if __name__ == "__main__":
    sys.exit(main())
