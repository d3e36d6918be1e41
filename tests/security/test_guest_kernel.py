"""Boundary: the guest kernel itself, the wall a container must break to reach the VM's
devices. Its command line turned off the speculation mitigations and KASLR everywhere; that
now happens only under TCG (an emulated CPU has no speculation to exploit, and the mitigations
cost emulation much), while under KVM the kernel's defaults stand. And it is built with the
cheap hardening options (stack protector, hardened usercopy, ...), whose cost bench/hardening.py
measures."""

from __future__ import annotations

from pathlib import Path

import pytest

from runv_py.vm.qemu.cmdline import KernelParams, kernel_cmdline
from tests.conftest import TOP
from tests.unit.test_kernel_fragment import _options

TCG_ONLY = {"mitigations=off", "nokaslr"}
HARDENING = {
    "CONFIG_CPU_MITIGATIONS": "y", "CONFIG_PAGE_TABLE_ISOLATION": "y", "CONFIG_RETPOLINE": "y",
    "CONFIG_STACKPROTECTOR_STRONG": "y", "CONFIG_VMAP_STACK": "y",
    "CONFIG_HARDENED_USERCOPY": "y", "CONFIG_FORTIFY_SOURCE": "y",
    "CONFIG_SLAB_FREELIST_RANDOM": "y", "CONFIG_SLAB_FREELIST_HARDENED": "y",
    "CONFIG_SECURITY_DMESG_RESTRICT": "y", "CONFIG_DEVPORT": "n", "CONFIG_DEVMEM": "n",
    "CONFIG_BPF_SYSCALL": "y", "CONFIG_CGROUP_BPF": "y",  # the device cgroup
    # Only the 64-bit ABI: the seccomp profile covers that one alone, and 32-bit programs
    # cannot go around its socket rule through socketcall(2).
    "CONFIG_IA32_EMULATION": "n", "CONFIG_X86_X32_ABI": "n",
}


@pytest.mark.parametrize("machine", ["microvm", "pc", "q35"])
@pytest.mark.parametrize("root", ["block", "initrd", "floor"])
def test_mitigations_and_kaslr_are_off_only_under_tcg(machine: str, root: str) -> None:
    kvm = set(kernel_cmdline(KernelParams(machine, "kvm", root)).split())  # type: ignore[arg-type]
    tcg = set(kernel_cmdline(KernelParams(machine, "tcg", root)).split())  # type: ignore[arg-type]
    assert not kvm & TCG_ONLY, kvm
    assert tcg >= TCG_ONLY
    assert kvm == tcg - TCG_ONLY


def test_the_guest_kernel_is_built_hardened(assets_dir: Path) -> None:
    fragment = _options((TOP / "guest-kernel/fragment.config").read_text())
    built = _options((assets_dir / "kernel/config").read_text())
    missing = {k: built.get(k, "n") for k, v in HARDENING.items() if built.get(k, "n") != v}
    assert not missing, f"the built guest kernel lacks {missing}"
    # init_on_free stays off by default: it zeroes all guest RAM at boot (docs/benchmarks.md).
    assert fragment.get("CONFIG_INIT_ON_FREE_DEFAULT_ON") == "n"
