"""vm/libvirt/domain.py: the domain XML libvirt gets for a VmConfig (the same VM as QEMU's argv
from vm/qemu/cmdline.py), checked against libvirt's own schema where Debian ships it."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from runv_py.devices import Disk, Nic, Share, TapFd
from runv_py.errors import ConfigError
from runv_py.vm.libvirt.domain import (
    QEMU_NS,
    DomainOwner,
    domain_name,
    domain_xml,
    owner_of,
)
from runv_py.vm.qemu.cmdline import VmConfig

OWNER = DomainOwner(pid=4242, start_time=777)


def _config(**overrides: object) -> VmConfig:
    base: dict[str, object] = dict(
        name="sb1", qemu="qemu-system-x86_64", machine="pc", accel="tcg", vcpus=2,
        memory_mib=384, kernel=Path("/k/vmlinux"), kernel_cmdline="console=ttyS0 quiet",
        console_log=Path("/s/console.log"), qmp_socket=Path("/s/qmp.sock"),
        root_image=Path("/a/rootfs.erofs"), agent_socket=Path("/s/agent.sock"))
    base.update(overrides)
    return VmConfig(**base)  # type: ignore[arg-type]


def _xml(config: VmConfig, share_root: str = "") -> ET.Element:
    return ET.fromstring(domain_xml(config, OWNER, share_root=share_root))


def _xml_with_console(config: VmConfig) -> ET.Element:
    return ET.fromstring(domain_xml(config, OWNER, console_socket=Path("/s/console.sock")))


def test_the_kernel_boot_memory_cpu_and_identity() -> None:
    root = _xml(_config(vmgenid="3f94b7f9-1f2e-4448-bc5d-0cb8e0d5adc5"))
    assert root.get("type") == "qemu" and root.findtext("name") == "runv-sb1"
    assert domain_name(_config()) == "runv-sb1"
    assert root.find("memory").text == "384" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    assert root.findtext("genid") == "3f94b7f9-1f2e-4448-bc5d-0cb8e0d5adc5"
    assert root.find("os/type").get("machine") == "pc"
    assert root.findtext("os/kernel") == "/k/vmlinux"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert root.find("os/initrd") is None and root.find("features/acpi") is not None
    assert root.find("cpu").get("mode") == "maximum"  # -cpu max under TCG
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    assert root.find("memoryBacking") is None
    seclabel = root.find("seclabel")  # root, whatever qemu.conf says; none of our files chowned
    assert seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+0:+0"
    assert root.find("features/tcg") is None
    capped = _xml(_config(machine="microvm", tcg_cache_mib=32))
    assert capped.find("features/acpi") is None
    assert capped.find("features/tcg/tb-cache").attrib == {"unit": "MiB"}
    assert capped.findtext("features/tcg/tb-cache") == "32"
    assert _xml(_config(accel="kvm", tcg_cache_mib=32)).find("features/tcg") is None
    kvm = _xml(_config(accel="kvm"))
    assert kvm.get("type") == "kvm" and kvm.find("cpu").get("mode") == "host-passthrough"
    model = _xml(_config(cpu="Skylake-Server", initrd=Path("/a/initrd")))
    assert model.findtext("cpu/model") == "Skylake-Server"
    assert model.findtext("os/initrd") == "/a/initrd"


def test_devices_read_only_root_console_agent_port_rng() -> None:
    devices = _xml(_config()).find("devices")
    assert devices is not None
    assert devices.findtext("emulator") == shutil.which("qemu-system-x86_64")
    disk = devices.find("disk")
    assert disk.find("source").get("file") == "/a/rootfs.erofs"
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("readonly") is not None
    assert devices.find("serial").get("type") == "null"  # no owner's socket: nowhere
    console = _xml_with_console(_config()).find("devices/serial")
    assert console.get("type") == "unix"  # to the owner, who bounds the log
    assert console.find("source").attrib == {"mode": "connect", "path": "/s/console.sock"}
    channel = devices.find("channel")
    assert channel.find("source").attrib == {"mode": "bind", "path": "/s/agent.sock"}
    assert channel.find("target").get("name") == "agent.channel.0"
    assert channel.find("alias").get("name") == "ua-agent0"  # libvirt keeps "ua-" aliases
    assert devices.find("rng/backend").text == "/dev/urandom"
    assert devices.find("memballoon").get("model") == "none"


def test_shares_over_9p_through_the_owners_root_and_virtio_fs_on_its_socket() -> None:
    config = _config(shared_memory=True, shares=(
        Share("runvshared", Path("/run/x/shared")),
        Share("ro", Path("/data"), readonly=True),
        Share("fast", Path("/y"), driver="virtiofs", socket=Path("/s/vfs2.sock"))))
    root = _xml(config, share_root="/proc/4242/root")
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    nine, ro, fast = root.findall("devices/filesystem")
    assert nine.get("accessmode") == "passthrough" and nine.get("multidevs") == "remap"
    assert nine.find("source").get("dir") == "/proc/4242/root/run/x/shared"
    assert nine.find("target").get("dir") == "runvshared" and nine.find("readonly") is None
    assert ro.find("readonly") is not None
    assert fast.find("driver").get("type") == "virtiofs"
    assert fast.find("source").get("socket") == "/s/vfs2.sock"
    with pytest.raises(ValueError, match="virtio-fs needs a socket and shared memory"):
        domain_xml(_config(shares=(Share("f", Path("/y"), driver="virtiofs"),)), OWNER)


def test_vsock_our_vhost_user_backend_as_extra_argv_or_the_kernels_by_cid() -> None:
    hybrid = _xml(_config(vsock_socket=Path("/s/vhost-vsock.sock"), shared_memory=True))
    args = [a.get("value") for a in hybrid.iter(f"{{{QEMU_NS}}}arg")]
    assert args == ["-chardev", "socket,id=runv-vsock,path=/s/vhost-vsock.sock", "-device",
                    "vhost-user-vsock-pci,chardev=runv-vsock,id=vsock0,bus=pci.0,addr=0x1f"]
    assert hybrid.find("devices/vsock") is None
    kernel = _xml(_config(vsock_cid=7, vsock_fd=9))
    assert kernel.find("devices/vsock/cid").attrib == {"auto": "no", "address": "7"}
    assert kernel.find(f"{{{QEMU_NS}}}commandline") is None
    with pytest.raises(ValueError, match="needs shared memory"):
        domain_xml(_config(vsock_socket=Path("/s/v.sock")), OWNER)


def test_nics_are_not_in_the_xml_they_are_plugged_over_the_monitor() -> None:
    nic = Nic("net2", "02:00:00:00:00:01", backend=TapFd(5))
    assert _xml(_config(nics=(nic,))).find("devices/interface") is None


def test_a_template_clone_is_refused_in_one_line() -> None:
    for config in (_config(incoming=True),
                   _config(memory_file=Path("/t/memory"), memory_file_shared=True)):
        with pytest.raises(ConfigError) as info:
            domain_xml(config, OWNER)
        assert 'backend = "qemu"' in str(info.value) and "\n" not in str(info.value)


def test_a_block_rootfs_is_refused_in_one_line() -> None:
    disk = Disk(id="rw", path=Path("/d/disk.img"), serial="runv-rw")
    with pytest.raises(ConfigError) as info:
        domain_xml(_config(disks=(disk,)), OWNER)
    assert "--rootfs shared" in str(info.value) and "\n" not in str(info.value)


def test_the_owner_is_in_the_metadata_for_the_reconciler() -> None:
    assert owner_of(domain_xml(_config(), OWNER)) == ("sb1", OWNER)
    assert owner_of("<domain><name>other</name></domain>") is None
    assert owner_of("not xml") is None


def test_libvirt_schema_accepts_the_xml(tmp_path: Path) -> None:
    """virt-xml-validate (libvirt-clients, with xmllint) against the schema libvirt-daemon
    installs."""
    config = _config(vmgenid="3f94b7f9-1f2e-4448-bc5d-0cb8e0d5adc5", shared_memory=True,
                     vsock_socket=Path("/s/v.sock"), tcg_cache_mib=32,
                     shares=(Share("a", Path("/a")),
                             Share("b", Path("/b"), driver="virtiofs", socket=Path("/s/b"))))
    path = tmp_path / "domain.xml"
    path.write_text(domain_xml(config, OWNER, share_root="/proc/1/root",
                               console_socket=Path("/s/console.sock")))
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
