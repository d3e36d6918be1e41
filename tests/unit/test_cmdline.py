from __future__ import annotations

from pathlib import Path

import pytest

from runv_py.devices import HubPort, Nic, Share, TapFd
from runv_py.errors import ConfigError
from runv_py.vm.qemu.cmdline import (
    KernelParams,
    VmConfig,
    inherited_fds,
    kernel_cmdline,
    qemu_argv,
)


def _config(**overrides: object) -> VmConfig:
    base: dict[str, object] = dict(
        name="t1", qemu="qemu-system-x86_64", machine="microvm", accel="tcg", vcpus=1,
        memory_mib=256, kernel=Path("/k/vmlinux"), kernel_cmdline="console=ttyS0",
        console_log=Path("/s/console.log"), qmp_socket=Path("/s/qmp.sock"),
        root_image=Path("/a/rootfs.erofs"), agent_socket=Path("/s/agent.sock"))
    base.update(overrides)
    return VmConfig(**base)  # type: ignore[arg-type]


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_uses_modern_mmio_devices() -> None:
    argv = qemu_argv(_config())
    assert "virtio-mmio.force-legacy=false" in _pairs(argv, "-global")
    devices = _pairs(argv, "-device")
    assert "virtio-blk-device,drive=rootfs" in devices
    assert "virtio-serial-device,id=vser0" in devices
    assert any(d.startswith("virtserialport,") and "name=agent.channel.0" in d for d in devices)
    machine = _pairs(argv, "-machine")[0]
    assert machine.startswith("microvm,") and machine.endswith("accel=tcg")
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_pc_uses_pci_devices_and_no_mmio_global() -> None:
    argv = qemu_argv(_config(machine="pc"))
    assert not _pairs(argv, "-global")
    assert "virtio-blk-pci,drive=rootfs" in _pairs(argv, "-device")
    assert _pairs(argv, "-machine") == ["pc,accel=tcg"]


def test_room_to_grow_is_declared_on_machine_pc() -> None:
    argv = qemu_argv(_config(machine="pc", max_memory_mib=8192, max_vcpus=4))
    assert _pairs(argv, "-smp") == ["1,maxcpus=4"]
    assert _pairs(argv, "-m") == ["256M,slots=8,maxmem=8192M"]
    plain = qemu_argv(_config(machine="pc"))
    assert (_pairs(plain, "-smp"), _pairs(plain, "-m")) == (["1"], ["256M"])
    # Hot-plugged memory goes to ZONE_MOVABLE, so that it can be unplugged.
    assert "memhp_default_state=online_movable" in kernel_cmdline(
        KernelParams("pc", "tcg", "block")).split()
    assert "memhp_default_state" not in kernel_cmdline(KernelParams("microvm", "tcg", "block"))


def test_pc_routes_pci_interrupts_without_acpi() -> None:
    """A hot-plugged device's probe evaluated ACPI's interrupt routing (0.13 s under TCG, in
    every template clone's start); its virtio devices use MSI-X."""
    for accel in ("tcg", "kvm"):
        assert "acpi=noirq" in kernel_cmdline(KernelParams("pc", accel, "block")).split()
    assert "acpi=noirq" not in kernel_cmdline(KernelParams("microvm", "tcg", "block"))


def test_tcg_translation_cache_size() -> None:
    """A TCG QEMU is told its translated-code cache size when configured (then -accel carries
    the accelerator, not -machine); KVM has no such cache."""
    argv = qemu_argv(_config(machine="pc", tcg_cache_mib=32))
    assert _pairs(argv, "-machine") == ["pc"] and _pairs(argv, "-accel") == ["tcg,tb-size=32"]
    kvm = qemu_argv(_config(machine="pc", accel="kvm", tcg_cache_mib=32))
    assert _pairs(kvm, "-machine") == ["pc,accel=kvm"] and not _pairs(kvm, "-accel")
    assert not _pairs(qemu_argv(_config()), "-accel")


def test_cpu_model() -> None:
    assert _pairs(qemu_argv(_config(accel="kvm")), "-cpu") == ["host"]
    assert _pairs(qemu_argv(_config(accel="tcg")), "-cpu") == ["max"]
    assert _pairs(qemu_argv(_config(cpu="qemu64")), "-cpu") == ["qemu64"]


def test_shared_memory_puts_ram_in_a_shareable_memfd() -> None:
    argv = qemu_argv(_config(shared_memory=True, memory_mib=512))
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in _pairs(argv, "-object")
    assert _pairs(argv, "-machine")[0].endswith(",memory-backend=mem")


def test_readonly_root_drive_and_initrd() -> None:
    argv = qemu_argv(_config())
    assert "file=/a/rootfs.erofs,if=none,id=rootfs,format=raw,readonly=on" in _pairs(argv, "-drive")
    argv = qemu_argv(_config(root_image=None, initrd=Path("/a/initrd.img")))
    assert _pairs(argv, "-initrd") == ["/a/initrd.img"] and not _pairs(argv, "-drive")


def test_a_tcg_guest_keeps_the_tsc_as_its_clock() -> None:
    """On every machine (a template clone is on pc): else the pc guest marks the TSC unstable
    and reads the emulated HPET for every clock_gettime (tests/vm: the clone's clocksource)."""
    for machine in ("microvm", "pc"):
        line = kernel_cmdline(KernelParams(machine, "tcg", "block", tsc_khz=2100000)).split()
        assert "tsc_early_khz=2100000" in line and "tsc=reliable" in line
        assert "root=/dev/vda" in line and "init=/sbin/hyperstart" in line
    for machine in ("microvm", "pc"):
        kvm = kernel_cmdline(KernelParams(machine, "kvm", "block", 2100000))
        assert "tsc_early_khz" not in kvm and "tsc=reliable" not in kvm
    assert "tsc" not in kernel_cmdline(KernelParams("pc", "tcg", "block", None))


def test_root_kinds() -> None:
    assert "rdinit=/sbin/hyperstart" in kernel_cmdline(KernelParams("pc", "tcg", "initrd")).split()
    floor = kernel_cmdline(KernelParams("pc", "tcg", "floor")).split()
    assert not [w for w in floor if "init=" in w or w.startswith("hyperstart.")]


def test_debug_and_extra_params() -> None:
    params = KernelParams("pc", "tcg", "block", debug=True, extra="foo=1 bar")
    words = kernel_cmdline(params).split()
    assert "quiet" not in words and "hyperstart.debug=1" in words
    assert words[-2:] == ["foo=1", "bar"]


def test_nics_on_a_hub() -> None:
    nics = (Nic("n0", "02:00:00:00:00:01", mtu=1400), Nic("n1", "02:00:00:00:00:02"))
    argv = qemu_argv(_config(nics=nics))
    assert _pairs(argv, "-netdev") == ["hubport,id=net-n0,hubid=0", "hubport,id=net-n1,hubid=0"]
    devices = _pairs(argv, "-device")
    assert ("virtio-net-device,netdev=net-n0,mac=02:00:00:00:00:01,host_mtu=1400,id=nic-n0"
            in devices)
    assert "virtio-net-device,netdev=net-n1,mac=02:00:00:00:00:02,id=nic-n1" in devices
    argv = qemu_argv(_config(machine="q35", nics=(Nic("a", "02:00:00:00:00:03",
                                                       backend=HubPort(7)),)))
    assert _pairs(argv, "-netdev") == ["hubport,id=net-a,hubid=7"]
    assert "virtio-net-pci,netdev=net-a,mac=02:00:00:00:00:03,id=nic-a" in _pairs(argv, "-device")


def test_nic_on_an_inherited_tap_fd() -> None:
    config = _config(nics=(Nic("net0", "02:00:00:00:00:04", mtu=9000, backend=TapFd(7)),
                           Nic("h", "02:00:00:00:00:05")))
    argv = qemu_argv(config)
    assert _pairs(argv, "-netdev") == ["tap,id=net-net0,fd=7,vhost=off",
                                       "hubport,id=net-h,hubid=0"]
    assert ("virtio-net-device,netdev=net-net0,mac=02:00:00:00:00:04,host_mtu=9000,"
            "id=nic-net0" in _pairs(argv, "-device"))
    assert inherited_fds(config) == (7,)


@pytest.mark.parametrize(("nic_id", "mac", "mtu", "error"), [
    ("n0,x=1", "02:00:00:00:00:01", 0, "nic id"),
    ("n0", "02:00:00:00:00:01,romfile=/x", 0, "is not aa:bb"),
    ("n0", "02-00-00-00-00-01", 0, "is not aa:bb"),
    ("n0", "03:00:00:00:00:01", 0, "multicast"),
    ("n0", "02:00:00:00:00:01", 67, "mtu 67"),
])
def test_nic_fields_that_would_break_the_argv_are_refused(
        nic_id: str, mac: str, mtu: int, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Nic(nic_id, mac, mtu)


def test_virtiofs_share_connects_to_its_daemon_and_needs_shared_memory() -> None:
    share = Share("runvshared", Path("/s"), driver="virtiofs", socket=Path("/x/vfs0.sock"))
    argv = qemu_argv(_config(shares=(share,), shared_memory=True))
    assert "socket,id=vfs0,path=/x/vfs0.sock" in argv
    assert "vhost-user-fs-device,chardev=vfs0,tag=runvshared" in argv
    with pytest.raises(ValueError, match="shared memory"):
        qemu_argv(_config(shares=(share,)))


def test_9p_share_remaps_inodes_of_submounts() -> None:
    argv = qemu_argv(_config(shares=(Share("t", Path("/s"), readonly=True),)))
    assert ("local,id=fs0,path=/s,security_model=passthrough,multidevs=remap,readonly=on"
            in argv)


def test_vsock_channel_devices_and_kernel_option() -> None:
    argv = qemu_argv(_config(agent_socket=None, vsock_socket=Path("/s/vhost-vsock.sock"),
                             shared_memory=True))
    devices = _pairs(argv, "-device")
    assert "vhost-user-vsock-device,chardev=vsock" in devices
    assert not any(d.startswith("virtserialport") for d in devices)
    assert "socket,id=vsock,path=/s/vhost-vsock.sock" in _pairs(argv, "-chardev")
    assert any(o.startswith("memory-backend-memfd,") for o in _pairs(argv, "-object"))
    pci = qemu_argv(_config(machine="q35", vsock_socket=Path("/v"), shared_memory=True))
    assert "vhost-user-vsock-pci,chardev=vsock" in _pairs(pci, "-device")
    kernel = qemu_argv(_config(vsock_cid=7, vsock_fd=9))
    assert "vhost-vsock-device,guest-cid=7,vhostfd=9" in _pairs(kernel, "-device")
    with pytest.raises(ValueError, match="shared memory"):
        qemu_argv(_config(vsock_socket=Path("/v")))
    words = kernel_cmdline(KernelParams(machine="microvm", accel="tcg", root="block",
                                        channel="vsock")).split()
    assert "hyperstart.channel=vsock:1024" in words
    words = kernel_cmdline(KernelParams(machine="microvm", accel="tcg", root="block")).split()
    assert "hyperstart.channel=serial:agent.channel.0" in words


def test_disks_by_serial_with_a_fixed_slot_on_pci_only() -> None:
    from runv_py.devices import Disk

    disks = (Disk("img-1", Path("/i/a.erofs"), "rv-1-i", readonly=True),
             Disk("rw-1", Path("/c/disk.img"), "rv-1-w", slot=0x10))
    argv = qemu_argv(_config(machine="pc", disks=disks))
    drives = _pairs(argv, "-drive")
    assert "file=/i/a.erofs,if=none,id=drive-img-1,format=raw,readonly=on" in drives
    assert "file=/c/disk.img,if=none,id=drive-rw-1,format=raw,cache=unsafe" in drives
    devices = _pairs(argv, "-device")
    assert "virtio-blk-pci,drive=drive-img-1,id=disk-img-1,serial=rv-1-i" in devices
    assert "virtio-blk-pci,drive=drive-rw-1,id=disk-rw-1,serial=rv-1-w,addr=0x10" in devices
    microvm = _pairs(qemu_argv(_config(disks=disks)), "-device")
    assert "virtio-blk-device,drive=drive-rw-1,id=disk-rw-1,serial=rv-1-w" in microvm


def test_disks_come_as_inherited_files_in_fd_sets() -> None:
    """QEMU (unprivileged) opens no disk path: each disk is an fd the owner opened."""
    from runv_py.devices import Disk
    from runv_py.vm.qemu.cmdline import InheritedEnds

    disks = (Disk("img-1", Path("/i/a.erofs"), "rv-1-i", readonly=True),
             Disk("rw-1", Path("/c/disk.img"), "rv-1-w"))
    ends = InheritedEnds(console=3, qmp=4, disks=(7, 8))
    argv = qemu_argv(_config(machine="pc", disks=disks), ends)
    assert _pairs(argv, "-add-fd") == ["fd=7,set=1", "fd=8,set=2"]
    drives = _pairs(argv, "-drive")
    assert "file=/dev/fdset/1,if=none,id=drive-img-1,format=raw,readonly=on" in drives
    assert "file=/dev/fdset/2,if=none,id=drive-rw-1,format=raw,cache=unsafe,auto-read-only=off" \
        in drives
    assert not any("/i/a.erofs" in word or "/c/disk.img" in word for word in argv)
    assert {7, 8} <= set(ends.fds)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"id": "a b"}, "disk id"), ({"serial": "x" * 21}, "serial"),
    ({"path": Path("/a,b")}, "cannot be given to QEMU"), ({"slot": 2}, "PCI slot 2"),
])
def test_bad_disks(kwargs: dict[str, object], message: str) -> None:
    from runv_py.devices import Disk

    base: dict[str, object] = {"id": "d", "path": Path("/d"), "serial": "s"}
    with pytest.raises(ConfigError, match=message):
        Disk(**{**base, **kwargs})  # type: ignore[arg-type]
