"""bench/hardening: what the guest-side defaults of issue 18 cost, each against its baseline in
the same run (interleaved, so that the machine's load hits both alike).

- The hardened guest kernel against a baseline kernel (`--baseline-kernel`, a kernel asset
  directory built without the hardening options, e.g. main's), both with the current guest
  image; and the hardened kernel with `init_on_free=1` on its command line. For each: the raw
  boot (bench/boot's floor), a cold boot to agent ready, a start from a template (each variant
  has its own template, built before the measurement), the host memory QEMU holds after a
  cold boot, what a clone holds of its own (Private_Dirty) and the template's size on disk.
- The default seccomp profile (docker's) against none: in one VM, creating and starting a
  container of `true` to its exit status through the agent, alternately with and without the
  profile; and `hyperctl run --rm busybox true` end to end, default against
  `--security-opt seccomp=unconfined`.

    python bench/hardening.py --baseline-kernel /var/cache/runv-py/kernel-<key> [--n 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
from bundle import report, summary

from runv_py import config
from runv_py.agent.convert import Storage
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm, ensure_template
from runv_py.workload import seccomp_profile
from runv_py.workload.bundle import CAPABILITIES

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")


def _variant_assets(top: Path, name: str, kernel: Path, current: Path) -> Path:
    """An assets directory with `kernel` and the current guest image and floor."""
    directory = top / f"assets-{name}"
    directory.mkdir()
    (directory / "kernel").symlink_to(kernel.resolve())
    for part in ("rootfs", "floor"):
        (directory / part).symlink_to((current / part).resolve())
    return directory


def _qemu_memory_mib(sandbox: GuestVm, field: str) -> float:
    """A field of QEMU's smaps_rollup (Rss, Private_Dirty...), in MiB."""
    assert sandbox.machine is not None and sandbox.machine.pid is not None
    for line in Path(f"/proc/{sandbox.machine.pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def _disk_mib(path: Path) -> float:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) / 2**20


async def _kernel_round(cfg: config.RuntimeConfig, out: dict[str, list[float]]) -> None:
    out.setdefault("floor_s", []).append(await floor_boot(cfg))
    async with await GuestVm.boot(replace(cfg, template="off")) as sandbox:
        out.setdefault("cold_ready_s", []).append(sandbox.timings["total"])
        out.setdefault("cold_qemu_rss_mib", []).append(_qemu_memory_mib(sandbox, "Rss"))
    async with await GuestVm.boot(replace(cfg, template="auto")) as sandbox:
        assert sandbox.start_path == "template", sandbox.start_path
        out.setdefault("template_ready_s", []).append(sandbox.timings["total"])
        # What a clone holds of its own (copied on write from the template's RAM).
        out.setdefault("clone_private_mib", []).append(
            _qemu_memory_mib(sandbox, "Private_Dirty"))


async def bench_kernels(base: config.RuntimeConfig, top: Path, baseline: Path, n: int
                        ) -> dict[str, Any]:
    current = base.guest.assets_dir
    variants: dict[str, config.RuntimeConfig] = {}
    for name, kernel, params in (("baseline", baseline, ""),
                                 ("hardened", current / "kernel", ""),
                                 ("hardened+init_on_free", current / "kernel", "init_on_free=1")):
        assets = _variant_assets(top, name, kernel, current)
        cfg = replace(base, guest=replace(base.guest, assets_dir=assets),
                      hypervisor=replace(base.hypervisor, kernel_params=params),
                      template_dir=top / f"templates-{name}")
        await ensure_template(cfg)
        variants[name] = cfg
    template_disk = {name: round(_disk_mib(cfg.template_dir), 1)
                     for name, cfg in variants.items()}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    names = list(variants)
    for i in range(n):
        # Each round starts with another variant, so that none always follows the same one.
        for name in names[i % len(names):] + names[:i % len(names)]:
            await _kernel_round(variants[name], samples[name])
        print(f"[bench/hardening] kernels {i + 1}/{n}", file=sys.stderr)
    result: dict[str, Any] = {name: {k: summary(v) for k, v in s.items()}
                              for name, s in samples.items()}
    result["template_disk_mib"] = template_disk
    base_medians = {k: statistics.median(v) for k, v in samples["baseline"].items()}
    result["ratios_to_baseline"] = {
        name: {k: round(statistics.median(v) / base_medians[k], 3) for k, v in s.items()}
        for name, s in samples.items() if name != "baseline"}
    return result


def _busybox_rootfs(top: Path) -> Path:
    root = top / "rootfs"
    for d in ("bin", "proc", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "true").symlink_to("busybox")
    return root


def _spec(container_id: str, seccomp: dict[str, Any] | None) -> bytes:
    spec: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/",
                    "capabilities": {k: list(CAPABILITIES)
                                     for k in ("bounding", "effective", "permitted")}},
        "root": {"path": f"/run/hyperstart/storage/{container_id}", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }
    if seccomp is not None:
        spec["linux"]["seccomp"] = seccomp
    return json.dumps(spec).encode()


async def bench_seccomp_in_guest(cfg: config.RuntimeConfig, top: Path, n: int
                                 ) -> dict[str, Any]:
    profile = seccomp_profile.default_profile(CAPABILITIES)
    samples: dict[str, list[float]] = {"default": [], "none": []}
    async with await GuestVm.boot(cfg, shares=(Share("r", _busybox_rootfs(top), readonly=True),)
                                  ) as sandbox:
        agent = sandbox.agent
        assert agent is not None
        kinds: list[tuple[str, dict[str, Any] | None]] = [("default", profile), ("none", None)]
        for i in range(n + 1):  # the first pair warms up (TCG translates the path once)
            for kind, seccomp in kinds if i % 2 else kinds[::-1]:
                cid = f"{kind}{i}"
                t0 = time.monotonic()
                await agent.create_container(cid, _spec(cid, seccomp), storages=(
                    Storage("9p", "r", f"/run/hyperstart/storage/{cid}"),))
                await agent.start_container(cid)
                assert await agent.wait_process(cid, timeout_s=120) == 0
                if i:
                    samples[kind].append(time.monotonic() - t0)
                await agent.remove_container(cid)
    return {**{k: summary(v) for k, v in samples.items()},
            "default_over_none": round(statistics.median(samples["default"])
                                       / statistics.median(samples["none"]), 3)}


def bench_seccomp_hyperctl(cfg: config.RuntimeConfig, top: Path, n: int) -> dict[str, Any]:
    cfg_file = top / "hyperctl.toml"
    cfg_file.write_text(f'state_dir = "{top / "hc-state"}"\ntemplate_dir = "{cfg.template_dir}"\n')
    env = dict(os.environ, RUNV_CONFIG=str(cfg_file), HYPERCTL_ROOT=str(top / "hc-root"),
               HYPERCTL_DATA_ROOT=str(top / "hc-data"),
               RUNV_ASSETS_DIR=str(cfg.guest.assets_dir))
    samples: dict[str, list[float]] = {"default": [], "unconfined": []}
    for i in range(n + 1):
        for kind, taken in list(samples.items())[::1 if i % 2 else -1]:
            t0 = time.monotonic()
            subprocess.run([HYPERCTL, "run", "--rm", "--security-opt", f"seccomp={kind}",
                            "busybox", "true"], env=env, check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i:
                taken.append(time.monotonic() - t0)
    return {**{k: summary(v) for k, v in samples.items()},
            "default_over_unconfined": round(statistics.median(samples["default"])
                                             / statistics.median(samples["unconfined"]), 3)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = config.load(args.config)
    top = Path(tempfile.mkdtemp(prefix="runv-bench-hard-"))
    base = replace(base, state_dir=top / "state", template_dir=top / "templates")
    try:
        result: dict[str, Any] = {}
        if not args.skip_kernels:
            result["kernels"] = await bench_kernels(base, top, Path(args.baseline_kernel),
                                                    args.n)
        result["seccomp_container_start_in_guest"] = await bench_seccomp_in_guest(
            replace(base, template="off"), top, args.n * 2)
        await ensure_template(base)
        result["seccomp_hyperctl_run"] = bench_seccomp_hyperctl(base, top, args.n)
        return result
    finally:
        shutil.rmtree(top, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-kernel", help="kernel asset directory without hardening")
    parser.add_argument("--skip-kernels", action="store_true", help="only the seccomp part")
    parser.add_argument("--n", type=int, default=8, help="rounds")
    parser.add_argument("--config", help="runtime config file")
    parser.add_argument("--json", help="also write the full result here")
    args = parser.parse_args()
    if not args.skip_kernels and not args.baseline_kernel:
        parser.error("--baseline-kernel is required (or --skip-kernels)")
    report(asyncio.run(run(args)), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
