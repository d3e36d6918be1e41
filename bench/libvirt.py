"""bench/libvirt: the same `runv run` of a busybox bundle printing one line, through the qemu and
the libvirt backend, in one run, alternating (the machine's load falls on both alike).

- qemu-pc: `backend = "qemu"` with the VM libvirt runs (machine pc, template off, cold boot):
  the same guest, so libvirt / qemu-pc is what libvirt itself costs.
- libvirt: `backend = "libvirt"` on a private libvirtd (tests/libvirtd.py).
- qemu-default: the qemu backend as shipped (a template clone; the template built beforehand),
  for what choosing libvirt costs against the default start path.

The libvirt start's phases come from runv --debug (qemu: from the domain's definition to its
vCPUs running, NICs plugged).

    python bench/libvirt.py [--n 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import RUNV, make, report, summary
from start import median_phases, phases_of, timed_run

from tests.libvirtd import PrivateLibvirtd


def configs(top: Path, uri: str) -> dict[str, Path]:
    state = top / "state"
    texts = {
        "qemu-pc": f'state_dir = "{state}"\ntemplate = "off"\n[hypervisor]\nmachine = "pc"\n',
        "libvirt": f'state_dir = "{state}"\n[hypervisor]\nbackend = "libvirt"\n'
                   f'libvirt_uri = "{uri}"\n',
        "qemu-default": f'state_dir = "{state}"\n',
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = top / f"{name}.toml"
        paths[name].write_text(text)
    return paths


def run_once(top: Path, bundle: Path, config: Path, name: str) -> tuple[float, float, str]:
    env = dict(os.environ, RUNV_CONFIG=str(config))
    argv = [RUNV, "--root", str(top / "root"), "--debug", "run", "--bundle", str(bundle), name]
    t_line, t_exit, out, err = timed_run(argv, env)
    assert out == b"bench-line\n", out
    return t_line, t_exit, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-lv-"))
    daemon = PrivateLibvirtd()
    try:
        daemon.start()
        bundle = make(top, ["echo", "bench-line"])
        paths = configs(top, daemon.uri)
        # Warm-up, not measured: libvirtd probes QEMU once, the default path builds its
        # template, the page cache fills.
        for name, path in paths.items():
            run_once(top, bundle, path, f"warm-{name}")
        lines: dict[str, list[float]] = {name: [] for name in paths}
        exits: dict[str, list[float]] = {name: [] for name in paths}
        phases: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for i in range(args.n):
            for name, path in paths.items():
                t_line, t_exit, err = run_once(top, bundle, path, f"{name}-{i}")
                lines[name].append(t_line)
                exits[name].append(t_exit)
                phases[name].append(phases_of(err))
        result: dict[str, Any] = {
            name: {"to_line": summary(lines[name]), "to_exit": summary(exits[name]),
                   "phases_median_s": median_phases(phases[name],
                                                    statistics.median(lines[name]),
                                                    statistics.median(exits[name]))}
            for name in paths}
        libvirt = statistics.median(lines["libvirt"])
        result["ratios"] = {
            "libvirt_over_qemu_pc_to_line": round(libvirt / statistics.median(lines["qemu-pc"]),
                                                  2),
            "libvirt_over_qemu_default_to_line": round(
                libvirt / statistics.median(lines["qemu-default"]), 2),
        }
        result["domains_left"] = daemon.domains()
    finally:
        daemon.stop()
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
