"""A running VM saved to a directory (docs/snapshots.md), in the form a template has: the
guest's RAM as a file that restored VMs map copy-on-write, the device state without it, and
a copy of each writable disk; restored like a template clone, as many times as wanted.

QEMU 7.2 cannot write a running VM's RAM as such a file (a clone's RAM is a private mapping
of its template's), so the VM is migrated into a second QEMU, the converter, whose RAM is
that file mapped shared; the converter then saves its device state as a template build does
and quits. The saved VM has no vsock device and no NICs (the caller removes them first): they
are plugged into each restored VM as into a clone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..devices import Disk, Share
from ..errors import ConfigError, HypervisorError, RunvError
from ..storage import block
from ..vm.hypervisor import Machine
from ..vm.qemu.cmdline import VmConfig
from ..vm.qemu.machine import QemuMachine, tail
from .vm_template import MEMORY, SAVE_TIMEOUT_S, STATE, TemplateInputs

FORMAT = 1
VM_META = "vm.json"


@dataclass(frozen=True, slots=True)
class SavedDisk:
    """A disk of the saved VM: the image it had (read-only, used in place) or the copy of
    its writable layer in the snapshot (`file`, relative)."""

    id: str
    serial: str
    slot: int
    readonly: bool
    path: str

    def disk(self, snapshot_root: Path, path: Path | None = None) -> Disk:
        """The device of a restored VM, on `path` (its own copy of a writable layer)."""
        source = Path(self.path) if self.readonly else snapshot_root / self.path
        return Disk(self.id, path or source, self.serial, readonly=self.readonly,
                    slot=self.slot)


@dataclass(frozen=True, slots=True)
class SavedVm:
    format: int
    key: str                  # of the template inputs the restored VM must match
    inputs: dict[str, Any]
    memory_mib: int
    vcpus: int
    disks: tuple[SavedDisk, ...]
    created: float
    save_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)   # of save_s, in seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> SavedVm:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ConfigError(f"{where}: snapshot format {raw.get('format')!r}, this "
                                  f"runv-py reads {FORMAT}")
            raw["disks"] = tuple(SavedDisk(**d) for d in raw["disks"])
            return cls(**raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{where}: not a VM snapshot ({exc})") from None


@dataclass(frozen=True, slots=True)
class SnapshotImage:
    """A snapshot directory, as a template-like thing a VM is restored from."""

    root: Path

    @property
    def key(self) -> str:
        return f"snapshot {self.root}"

    @property
    def memory(self) -> Path:
        return self.root / MEMORY

    @property
    def state(self) -> Path:
        return self.root / STATE

    def saved(self) -> SavedVm:
        path = self.root / VM_META
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror} (not a snapshot directory)") from None
        saved = SavedVm.from_json(text, str(path))
        for name in (MEMORY, STATE, *(d.path for d in saved.disks if not d.readonly)):
            if not (self.root / name).is_file():
                raise ConfigError(f"snapshot {self.root}: {name} is missing")
        return saved

    def check(self, inputs: TemplateInputs) -> None:
        """The restoring VM must be the saved one's: same QEMU, kernel, guest image..."""
        saved = self.saved()
        if inputs.key != saved.key:
            mine = asdict(inputs)
            changed = sorted(k for k, v in saved.inputs.items() if mine.get(k) != v)
            raise ConfigError(f"snapshot {self.root} was made by another VM setup (changed: "
                              f"{', '.join(changed) or 'unknown'}); restore it with the QEMU, "
                              "guest kernel and image it was made with")

    def disk_bytes(self) -> int:
        """What the snapshot takes on disk (its files are sparse)."""
        return sum(p.stat().st_blocks * 512 for p in self.root.iterdir() if p.is_file())


def prepare_directory(directory: Path) -> None:
    """An empty directory of our own for a snapshot (made if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if any(directory.iterdir()):
            raise ConfigError(f"{directory}: the snapshot directory is not empty")
    except OSError as exc:
        raise ConfigError(f"{directory}: {exc.strerror}") from None


async def save(source: Machine, vm: VmConfig, directory: Path, *, run: Path,
               inputs: TemplateInputs, timeout_s: float = SAVE_TIMEOUT_S) -> SavedVm:
    """Pause `source` (a VM whose device set is `vm`: a clone's, plus its disks at fixed
    slots) and save it into `directory`: RAM file, device state, copies of its writable
    disks, vm.json. The source stays paused (resume or close it). `run`: a new directory
    for the converter QEMU (in the source's VM directory, so that it goes with it even when
    its owner is killed), removed afterwards."""
    t0 = time.monotonic()
    try:
        run.mkdir(mode=0o700)
    except OSError as exc:
        raise HypervisorError(f"{run}: {exc.strerror}") from None
    try:
        phases = await _convert(source, vm, directory, run, timeout_s)
        t_disks = time.monotonic()
        disks = []
        for disk in vm.disks:
            path = str(disk.path)
            if not disk.readonly:
                path = f"disk-{disk.id}.img"
                await asyncio.to_thread(block.copy_disk, disk.path, directory / path)
            disks.append(SavedDisk(disk.id, disk.serial, disk.slot, disk.readonly, path))
        phases["disks"] = time.monotonic() - t_disks
        saved = SavedVm(format=FORMAT, key=inputs.key, inputs=asdict(inputs),
                        memory_mib=vm.memory_mib, vcpus=vm.vcpus, disks=tuple(disks),
                        created=time.time(), save_s=round(time.monotonic() - t0, 3),
                        phases={k: round(v, 3) for k, v in phases.items()})
        (directory / VM_META).write_text(saved.to_json())
        return saved
    except BaseException:
        for entry in (MEMORY, STATE, VM_META, *(f"disk-{d.id}.img" for d in vm.disks)):
            with contextlib.suppress(OSError):
                (directory / entry).unlink()
        raise
    finally:
        shutil.rmtree(run, ignore_errors=True)


async def _convert(source: Machine, vm: VmConfig, directory: Path, run: Path,
                   timeout_s: float) -> dict[str, float]:
    """The source's RAM into directory/memory and its device state into directory/state,
    through a converter QEMU (see the module's comment); the phases' times."""
    shares = []
    for i, share in enumerate(vm.shares):
        placeholder = run / f"share{i}"
        placeholder.mkdir()
        shares.append(Share(share.tag, placeholder, readonly=share.readonly))
    converter_vm = replace(
        vm, name=f"{vm.name}-save", console_log=run / "console.log",
        qmp_socket=run / "qmp.sock", agent_socket=run / "agent.sock", shares=tuple(shares),
        nics=(), memory_file=directory / MEMORY, memory_file_shared=True, incoming=True,
        vmgenid=str(uuid.uuid4()))
    converter = QemuMachine(converter_vm, run / "qemu.log")
    stream = run / "migrate.sock"
    times = [time.monotonic()]
    try:
        await converter.start()
        await converter.migrate_in(f"unix:{stream}")
        times.append(time.monotonic())
        await source.migrate_out(f"unix:{stream}", timeout_s)
        await converter.migration_done(timeout_s)
        times.append(time.monotonic())
        fd = os.open(directory / STATE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            await converter.save_state(fd, timeout_s)
        finally:
            os.close(fd)
        times.append(time.monotonic())
        return {"converter_start": times[1] - times[0], "migrate": times[2] - times[1],
                "device_state": times[3] - times[2]}
    except RunvError as exc:
        raise HypervisorError(f"saving the VM failed: {exc}; the converter's log:\n"
                              f"{tail(run / 'qemu.log', 10)}") from exc
    finally:
        await converter.close()
