"""Accelerator choice: KVM only where it really works, else TCG with one log line saying why.

`/dev/kvm` alone proves nothing: on PVM-based nested KVM (module kvm_pvm) the device exists and
answers ioctls, but stock guest kernels hang. So KVM needs all of: the device opens read-write,
KVM_GET_API_VERSION is 12, the CPU advertises vmx or svm, and kvm_pvm is not what serves it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import AcceleratorError

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


def kvm_api_version(device: Path) -> int:
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class HostFacts:
    kvm_device: Path = Path("/dev/kvm")
    cpuinfo: Path = Path("/proc/cpuinfo")
    modules: Path = Path("/sys/module")
    api_version: Callable[[Path], int] = kvm_api_version


@dataclass(frozen=True, slots=True)
class Choice:
    accel: Literal["kvm", "tcg"]
    reason: str


def kvm_problem(facts: HostFacts = HostFacts()) -> str | None:
    """None when KVM is usable, else why not (one phrase)."""
    try:
        version = facts.api_version(facts.kvm_device)
    except FileNotFoundError:
        return f"{facts.kvm_device} does not exist"
    except OSError as exc:
        return f"cannot use {facts.kvm_device}: {exc.strerror}"
    if version != KVM_API_VERSION:
        return f"KVM API version {version}, expected {KVM_API_VERSION}"
    if (facts.modules / "kvm_pvm").exists():
        return "/dev/kvm is PVM nested KVM (kvm_pvm), on which stock guest kernels hang"
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in facts.cpuinfo.read_text().splitlines()
             if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "vmx" not in flags and "svm" not in flags:
        return "the CPU advertises no vmx/svm virtualization extensions"
    return None


def choose(wanted: Literal["auto", "kvm", "tcg"], facts: HostFacts = HostFacts()) -> Choice:
    if wanted == "tcg":
        return Choice("tcg", "TCG asked for in the configuration")
    problem = kvm_problem(facts)
    if wanted == "kvm":
        if problem:
            raise AcceleratorError(f"accelerator kvm asked for but unusable: {problem}; "
                                   "set [hypervisor] accelerator = \"auto\" or \"tcg\"")
        return Choice("kvm", "KVM asked for in the configuration")
    if problem:
        return Choice("tcg", f"using TCG (software emulation, slow): {problem}")
    return Choice("kvm", "KVM is usable")


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo"),
                 sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")) -> int | None:
    """The host TSC frequency: under TCG the guest reads the host's TSC, so a microvm guest
    (no PIT or HPET to calibrate against) is told the real rate with tsc_early_khz."""
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None
