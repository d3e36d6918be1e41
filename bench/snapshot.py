"""bench/snapshot: checkpoint, restore and fork of a running sandbox (docs/snapshots.md) through
the Python API, with the runtime's default config and a block rootfs (the only kind a VM can be
saved with), against starting the same sandbox afresh, in the same run:

- checkpoint: `snapshot()` of a sandbox with 64 MiB of memory written (a tmpfs file), wall
  time, the time the sandbox stood still, its phases (vm.json) and the snapshot's size on disk;
- restore: `restore()` up to the first output of a command in the restored sandbox, against
  `create()` up to the same (a template clone: the default start path);
- fork: `fork(5)` of a warmed sandbox (one snapshot restored 5 times) against 5 `create()`s
  at once, each up to its first output.

    python bench/snapshot.py [--n 3] [--fork 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import report, summary

from runv_py.api import AsyncSandbox
from runv_py.sandbox.vm_snapshot import VM_META, SavedVm

WARM_MIB = 64
# Memory the guest has written and must keep: a tmpfs file in the container.
WARM = f"dd if=/dev/urandom of=/dev/shm/warm bs=1M count={WARM_MIB} 2>/dev/null"


class Roots:
    def __init__(self, top: Path) -> None:
        self.state_root, self.data_root = top / "run", top / "data"

    async def create(self) -> AsyncSandbox:
        return await AsyncSandbox.create("busybox", rootfs="block", timeout=900,
                                         state_root=self.state_root, data_root=self.data_root)


async def _first_output(box: AsyncSandbox) -> None:
    result = await box.run(["echo", "ready"])
    assert result.stdout == b"ready\n", result


async def _created(roots: Roots) -> tuple[float, AsyncSandbox]:
    t0 = time.monotonic()
    box = await roots.create()
    await _first_output(box)
    return time.monotonic() - t0, box


async def bench(roots: Roots, n: int, forks: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    _, first = await _created(roots)   # the image's erofs and the template are made
    await first.close()
    for _ in range(n):
        create_s, box = await _created(roots)
        add("create_to_output_s", create_s)
        try:
            await box.run(["sh", "-c", WARM], check=True)
            t0 = time.monotonic()
            snapshot = await box.snapshot()
            add("checkpoint_s", time.monotonic() - t0)
            add("checkpoint_paused_s", snapshot.save_s)
            add("checkpoint_mib", snapshot.size / (1 << 20))
            saved = SavedVm.from_json((snapshot.path / VM_META).read_text(), "vm.json")
            for phase, seconds in saved.phases.items():
                add(f"checkpoint_{phase}_s", seconds)
            t0 = time.monotonic()
            restored = await AsyncSandbox.restore(snapshot, state_root=roots.state_root,
                                                  data_root=roots.data_root)
            await _first_output(restored)
            add("restore_to_output_s", time.monotonic() - t0)
            await restored.close()
            snapshot.remove()
        finally:
            await box.close()

    _, box = await _created(roots)
    try:
        await box.run(["sh", "-c", WARM], check=True)
        t0 = time.monotonic()
        made = await box.fork(forks)
        await asyncio.gather(*(_first_output(f) for f in made))
        add(f"fork_{forks}_s", time.monotonic() - t0)
        await asyncio.gather(*(f.close() for f in made))
    finally:
        await box.close()
    t0 = time.monotonic()
    cold = await asyncio.gather(*(_created(roots) for _ in range(forks)))
    add(f"create_{forks}_s", time.monotonic() - t0)
    await asyncio.gather(*(b.close() for _, b in cold))

    result: dict[str, Any] = {k: summary(v) for k, v in samples.items()}
    median = {k: v["median"] for k, v in result.items()}
    result["ratios"] = {
        "restore_over_create": round(median["restore_to_output_s"]
                                     / median["create_to_output_s"], 3),
        f"fork_{forks}_over_create_{forks}": round(median[f"fork_{forks}_s"]
                                                   / median[f"create_{forks}_s"], 3),
    }
    result["warm_mib"] = WARM_MIB
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--fork", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    os.environ.pop("RUNV_TENANT", None)
    try:
        result = {"snapshot": asyncio.run(bench(Roots(top), args.n, args.fork))}
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
