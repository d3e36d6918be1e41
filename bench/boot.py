"""bench/boot: how fast and how reliably the guest boots, against the raw-boot floor.

The floor is our kernel with a busybox initramfs that prints a marker and powers off, measured
in the same run as the agent boots: spawn of QEMU to the marker on the console. "Agent ready"
is spawn of QEMU to the first answered Check (cold boot) or to the clone's own identity
(template start, the default): the phases reported are the ones the start path has.
Reports median, p90, n and the raw samples.

    python bench/boot.py [--n 20] [--floor-n 50] [--machine microvm] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runv_py import assets, config
from runv_py.sandbox.guest_vm import GuestVm
from runv_py.vm import accel
from runv_py.vm.qemu.cmdline import KernelParams, VmConfig, kernel_cmdline
from runv_py.vm.qemu.machine import QemuMachine, tail


class BootHang(Exception):
    pass


# The floor's /init sleeps instead of powering off (images/build-floor.sh).
IDLE_PARAM = "runv.floor=idle"


async def start_floor(cfg: config.RuntimeConfig, state: Path, *, idle: bool = False,
                      timeout_s: float = 30.0) -> tuple[QemuMachine, float]:
    """QEMU running our kernel and the floor initramfs, of the default sandbox's size, in
    `state` (the caller closes it): the machine and the seconds from its spawn to the floor
    marker on the console. `idle`: its /init sleeps after the marker. Raises BootHang with
    the console log when the marker does not appear in time or QEMU exits without it."""
    floor = assets.find_floor(cfg.guest.assets_dir)
    choice = accel.choose(cfg.hypervisor.accelerator)
    hv = cfg.hypervisor
    params = KernelParams(hv.machine, choice.accel, "floor", tsc_khz=accel.host_tsc_khz(),
                          extra=IDLE_PARAM if idle else "")
    vm = VmConfig(
        name=state.name, qemu=hv.qemu, machine=hv.machine, accel=choice.accel,
        vcpus=hv.vcpus, memory_mib=hv.memory_mib, kernel=floor.vmlinux,
        kernel_cmdline=kernel_cmdline(params), console_log=state / "console.log",
        qmp_socket=state / "qmp.sock", initrd=floor.initrd, cpu=hv.cpu)
    machine = QemuMachine(vm, state / "qemu.log")
    try:
        await machine.start()
        assert machine.started_at is not None
        deadline = machine.started_at + timeout_s
        marker = floor.marker.encode()
        while time.monotonic() < deadline:
            seen = time.monotonic()
            if marker in vm.console_log.read_bytes():
                return machine, seen - machine.started_at
            if machine.exited.done():
                raise BootHang("QEMU exited before the marker:\n" + machine.describe_exit())
            await asyncio.sleep(0.005)
        raise BootHang(f"no marker after {timeout_s:g}s; console:\n{tail(vm.console_log)}")
    except BaseException:
        await machine.close()
        raise


async def floor_boot(cfg: config.RuntimeConfig, timeout_s: float = 30.0) -> float:
    """Seconds from QEMU's spawn to the floor marker on the console (it then powers off)."""
    state = Path(tempfile.mkdtemp(prefix="runv-floor-"))
    machine: QemuMachine | None = None
    try:
        machine, elapsed = await start_floor(cfg, state, timeout_s=timeout_s)
        await asyncio.wait_for(asyncio.shield(machine.exited), 10)
        return elapsed
    finally:
        if machine is not None:
            await machine.close()
        shutil.rmtree(state, ignore_errors=True)


# The host's work before QEMU starts: "prepare" on a cold boot, "template" (find or build the
# template, the clone's config) on a template start.
_HOST_PHASES = ("prepare", "template")


async def agent_boot(cfg: config.RuntimeConfig) -> dict[str, Any]:
    async with await GuestVm.boot(cfg) as sandbox:
        assert sandbox.agent is not None
        version = await sandbox.agent.version()
        details = await sandbox.agent.guest_details()
        timings = sandbox.timings
        host = sum(v for k, v in timings.items() if k in _HOST_PHASES)
        return {
            "start_path": sandbox.start_path,
            "ready_s": timings["total"] - host,
            "host_prepare_s": host,
            "phases_s": {k: v for k, v in timings.items()
                         if k not in _HOST_PHASES and k != "total"},
            # A template clone's agent booted when the template was built: its boot timings
            # are the template's, not this start's.
            "guest_ms": version.boot_timings_ms if sandbox.start_path == "cold" else None,
            "agent_rss_kib": details.agent_rss_kib,
            "agent_rss_anon_kib": details.agent_rss_anon_kib,
            "guest_used_mib": (details.mem_total_kib - details.mem_available_kib) / 1024,
            "guest_total_mib": details.mem_total_kib / 1024,
        }


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))] if ordered else None
    return {"median": statistics.median(ordered) if ordered else None, "p90": p90,
            "n": len(ordered), "samples": [round(s, 4) for s in samples]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = config.load(args.config)
    cfg = replace(base, hypervisor=replace(base.hypervisor, machine=args.machine),
                  state_dir=Path(tempfile.mkdtemp(prefix="runv-bench-")))
    floors: list[float] = []
    hangs: list[str] = []
    agents: list[dict[str, Any]] = []
    # Interleave the two kinds so that machine noise hits both alike.
    total = max(args.n, args.floor_n)
    for i in range(total):
        if i < args.floor_n:
            try:
                floors.append(await floor_boot(cfg))
            except BootHang as exc:
                hangs.append(str(exc))
        if i < args.n:
            agents.append(await agent_boot(cfg))
        print(f"[bench/boot] {i + 1}/{total}", file=sys.stderr)
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    ready = [a["ready_s"] for a in agents]
    floor_median = statistics.median(floors) if floors else float("nan")
    phases: dict[str, list[float]] = {}
    for a in agents:
        for name, seconds in a["phases_s"].items():
            phases.setdefault(f"{name}_s", []).append(seconds)
        g = a["guest_ms"]
        if not g:
            continue
        phases.setdefault("kernel_to_agent_start_s", []).append(g["agent_start"] / 1000)
        phases.setdefault("agent_imports_s", []).append(
            (g["imports_done"] - g["agent_start"]) / 1000)
        phases.setdefault("agent_server_start_s", []).append(
            (g["server_listening"] - g["imports_done"]) / 1000)
    return {
        "machine": args.machine,
        "accelerator": accel.choose(base.hypervisor.accelerator).accel,
        "start_paths": sorted({a["start_path"] for a in agents}),
        "floor_marker_s": summary(floors),
        "floor_hangs": len(hangs),
        "hang_logs": hangs,
        "agent_ready_s": summary(ready),
        "agent_ready_minus_floor_s": statistics.median(ready) - floor_median if ready else None,
        "guest_phases": {k: summary(v) for k, v in phases.items()},
        "host_prepare_s": summary([a["host_prepare_s"] for a in agents]),
        "agent_rss_kib": summary([float(a["agent_rss_kib"]) for a in agents]),
        "agent_rss_anon_kib": summary([float(a["agent_rss_anon_kib"]) for a in agents]),
        "guest_used_mib": summary([a["guest_used_mib"] for a in agents]),
        "guest_total_mib": agents[0]["guest_total_mib"] if agents else None,
    }


def _print(result: dict[str, Any]) -> None:
    print(f"bench/boot  machine={result['machine']} accel={result['accelerator']} "
          f"start={','.join(result['start_paths'])}")
    for key in ("floor_marker_s", "agent_ready_s", "host_prepare_s", "agent_rss_kib",
                "agent_rss_anon_kib", "guest_used_mib"):
        s = result[key]
        print(f"  {key:<28} median {s['median']:.3f}  p90 {s['p90']:.3f}  n {s['n']}")
    for key, s in result["guest_phases"].items():
        print(f"  {key:<28} median {s['median']:.3f}  p90 {s['p90']:.3f}  n {s['n']}")
    print(f"  {'agent_ready_minus_floor_s':<28} {result['agent_ready_minus_floor_s']:.3f}")
    print(f"  {'floor_hangs':<28} {result['floor_hangs']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="agent boots")
    parser.add_argument("--floor-n", type=int, default=50, help="raw floor boots")
    parser.add_argument("--machine", choices=("microvm", "pc", "q35"), default="microvm")
    parser.add_argument("--config", help="runtime config file")
    parser.add_argument("--json", help="also write the full result (raw samples) here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["floor_hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
