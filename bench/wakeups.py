"""bench/wakeups: what wakes an idle sandbox's guest. Every wake-up of an idle guest is CPU its
host spends (under TCG, emulated), so an idle sandbox costs what its guest's timers cost.

One `runv run` (default config) of a busybox container that shares the VM's pid namespace,
so that it sees the agent's threads and the kernel's: it sleeps, reads each thread's context
switches, the interrupt counts and the uptime, sleeps --seconds, reads them again, and prints
both at its end (nothing is written to its stdio in between: the output stream is idle, as a
detached container's is). Printed: the guest's local timer interrupts a second and each
thread that woke, by where it sleeps (wchan), per second.

    python bench/wakeups.py [--seconds 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import RUNV, make, report

SNAPSHOT = ("snap() { grep -H ctxt /proc/1/task/*/status /proc/[0-9]*/status; "
            "grep -H . /proc/1/task/*/wchan /proc/1/task/*/comm /proc/[0-9]*/wchan "
            "/proc/[0-9]*/comm; "
            "cat /proc/interrupts /proc/uptime; }; ")
STATUS = re.compile(r"(/proc/[\d/task]+)/status:(?:non)?voluntary_ctxt_switches:\s+(\d+)")
NAMED = re.compile(r"(/proc/[\d/task]+)/(wchan|comm):(.*)")


class Snapshot:
    def __init__(self, text: str) -> None:
        self.switches: collections.Counter[str] = collections.Counter()
        self.names: dict[str, dict[str, str]] = collections.defaultdict(dict)
        self.interrupts: dict[str, int] = {}  # "LOC", or "<irq> <what>"
        self.uptime = 0.0
        for line in text.splitlines():
            if m := STATUS.match(line):
                self.switches[m[1]] += int(m[2])
            elif m := NAMED.match(line):
                self.names[m[1]][m[2]] = m[3]
            elif re.match(r"^\s*(\d+|LOC):", line):
                irq, count, *what = line.split()
                irq = irq.rstrip(":")
                self.interrupts[irq if irq == "LOC" else " ".join([irq, *what])] = int(count)
            elif re.fullmatch(r"[\d.]+ [\d.]+", line.strip()):
                self.uptime = float(line.split()[0])

    def label(self, task: str) -> str:
        names = self.names.get(task, {})
        comm = names.get("comm", "?")
        if task.startswith("/proc/1/task/"):  # Python's threads keep the process's name
            comm = "agent" if comm == "hyperstart" else f"agent ({comm})"
        return f"{comm} in {names.get('wchan', '?')}"


def measure(seconds: float, top: Path) -> dict[str, Any]:
    script = (SNAPSHOT + f"sleep 5; snap > /dev/a; sleep {seconds}; snap > /dev/b; "
              "cat /dev/a; echo '#after'; cat /dev/b")
    bundle = make(top, ["sh", "-c", script])
    (bundle / "rootfs" / "bin" / "grep").symlink_to("busybox")
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                   if n["type"] != "pid"]
    (bundle / "config.json").write_text(json.dumps(spec))
    done = subprocess.run([RUNV, "--root", str(top / "state"), "run", "-b", str(bundle),
                           "wakeups"], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=seconds + 300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"runv run: exit {done.returncode}: {done.stderr.decode()[-500:]}")
    before_text, _, after_text = done.stdout.decode().partition("#after\n")
    before, after = Snapshot(before_text), Snapshot(after_text)
    interval = after.uptime - before.uptime
    woke = _rates(before.switches, after.switches, interval)
    woke.pop("/proc/1", None)  # the agent's threads are counted one by one
    interrupts = _rates(before.interrupts, after.interrupts, interval)
    return {"interval_s": round(interval, 1),
            "local_timer_interrupts_per_s": interrupts.pop("LOC", 0.0),
            "interrupts_per_s": interrupts,
            "threads_per_s": [{"thread": task, "what": after.label(task), "per_s": rate}
                              for task, rate in sorted(woke.items(), key=lambda kv: -kv[1])],
            "agent_wakeups_per_s": round(sum(rate for task, rate in woke.items()
                                             if task.startswith("/proc/1/")), 2)}


def _rates(before: Mapping[str, int], after: Mapping[str, int],
           interval: float) -> dict[str, float]:
    """What grew between the two snapshots, per second."""
    return {key: round((count - before.get(key, 0)) / interval, 2)
            for key, count in after.items() if count > before.get(key, 0)}

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-wakeups-"))
    try:
        report(measure(args.seconds, top), args.json)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
