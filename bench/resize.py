"""bench/resize: `runv update` that resizes a running sandbox's VM (docs/resize.md), against an
update in the same container that changes only a guest cgroup limit (no resize), same run.

Each round: grow (memory limit 512 MiB: a 512 MiB DIMM plugged, the guest adds it), shrink
(no limit: the DIMM emptied, ejected, its memory back to the host), baseline (pids limit). The
first round's grow also plugs and onlines one vCPU (CPU quota 2; vCPUs are not unplugged), so
it is reported on its own.

    python bench/resize.py [--n 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
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

from bundle import RUNV, make, report, runtime, summary


def _timed(root: Path, *args: str, stdin: bytes | None = None) -> float:
    started = time.monotonic()
    if stdin is None:
        runtime(RUNV, root, *args)
    else:
        subprocess.run([RUNV, "--root", str(root), *args], input=stdin, check=True,
                       stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-resize-"))
    root = top / "root"
    unlimited = json.dumps({"memory": {"limit": -1}}).encode()
    try:
        bundle = make(top, ["sleep", "3600"])
        runtime(RUNV, root, "run", "--detach", "--bundle", str(bundle), "rs")
        try:
            first = _timed(root, "update", "--memory", "512m", "--cpu-quota", "200000",
                           "--cpu-period", "100000", "rs")
            grow, shrink, baseline = [], [], []
            shrink.append(_timed(root, "update", "--resources", "-", "rs", stdin=unlimited))
            for i in range(args.n):
                baseline.append(_timed(root, "update", "--pids-limit", str(100 + i), "rs"))
                if i:
                    grow.append(_timed(root, "update", "--memory", "512m", "rs"))
                    shrink.append(_timed(root, "update", "--resources", "-", "rs",
                                         stdin=unlimited))
        finally:
            runtime(RUNV, root, "delete", "--force", "rs", check=False)
        base = summary(baseline)["median"]
        result: dict[str, Any] = {
            "baseline_update_no_resize": summary(baseline),
            "grow_512mib_and_1_vcpu_s": round(first, 4),
            "grow_512mib": summary(grow) if grow else "needs --n 2 or more",
            "shrink_512mib": summary(shrink),
            "grow_512mib_and_1_vcpu_over_baseline": round(first / base, 1),
            "shrink_512mib_over_baseline": round(summary(shrink)["median"] / base, 1),
        }
        if grow:
            result["grow_512mib_over_baseline"] = round(summary(grow)["median"] / base, 1)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
