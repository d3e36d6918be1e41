from __future__ import annotations

from pathlib import Path

import pytest

from runv_py import config
from runv_py.errors import ConfigError


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RUNV_CONFIG", raising=False)
    monkeypatch.delenv("RUNV_ASSETS_DIR", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    loaded = config.load()
    assert loaded.hypervisor.vcpus == 1 and loaded.hypervisor.machine == "microvm"
    assert loaded.hypervisor.accelerator == "auto"


def test_values_are_parsed_into_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNV_ASSETS_DIR", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('state_dir = "/tmp/x"\n[hypervisor]\nmachine = "pc"\nmemory_mib = 512\n'
                    'boot_timeout_s = 5\n[guest]\nassets_dir = "/a"\nrootfs = "initrd"\n')
    loaded = config.load(path)
    assert loaded.hypervisor.machine == "pc" and loaded.hypervisor.memory_mib == 512
    assert loaded.hypervisor.boot_timeout_s == 5.0 and loaded.state_dir == Path("/tmp/x")
    assert loaded.guest.assets_dir == Path("/a") and loaded.guest.rootfs == "initrd"


@pytest.mark.parametrize(("text", "message"), [
    ("[hypervisor]\nvcpu = 2\n", "unknown key 'vcpu'"),
    ("[hypervisor]\nvcpus = \"2\"\n", "vcpus must be an integer"),
    ("[hypervisor]\nvcpus = 0\n", "vcpus must be between 1 and 255"),
    ("[hypervisor]\nmachine = \"virt\"\n", "machine must be one of microvm, pc, q35"),
    ("[hypervisor]\naccelerator = \"hvf\"\n", "accelerator must be one of auto, kvm, tcg"),
    ("[gust]\n", "unknown key 'gust'"),
    ("hypervisor = 3\n", "[hypervisor]: must be a table"),
    ("[hypervisor\n", "not valid TOML"),
])
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


def test_assets_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    monkeypatch.delenv("RUNV_CONFIG", raising=False)
    monkeypatch.setenv("RUNV_ASSETS_DIR", "/elsewhere")
    assert config.load().guest.assets_dir == Path("/elsewhere")


def test_agent_channel_is_vsock_by_default_and_serial_on_request(tmp_path: Path) -> None:
    assert config.RuntimeConfig().guest.channel == "vsock"
    assert config.parse('[guest]\nchannel = "serial"\n', "c.toml").guest.channel == "serial"
    with pytest.raises(ConfigError, match=r"c.toml \[guest\]: channel must be one of vsock, "
                                          r"serial, not 'virtio'"):
        config.parse('[guest]\nchannel = "virtio"\n', "c.toml")


def test_pool_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[pool]\nsize = 3\nmemory_mib = 1024\nsizes = [[512, 2]]\nidle = "running"\n')
    pool = config.load(path).pool
    assert (pool.size, pool.memory_mib, pool.sizes, pool.idle) == (3, 1024, ((512, 2),),
                                                                   "running")
    assert config.RuntimeConfig().pool.size == 2 and config.RuntimeConfig().pool.idle == "paused"


@pytest.mark.parametrize(("text", "message"), [
    ('[pool]\nsizes = [[512]]\n', "sizes[0] must be a [memory_mib, vcpus] pair"),
    ('[pool]\nsizes = [[32, 1]]\n', "memory_mib must be between"),
    ('[pool]\nidle = "asleep"\n', "idle must be one of paused, running"),
    ('[pool]\nsize = -1\n', "size must be between 0 and 64"),
    ('[pool]\nwarm = 1\n', "unknown key 'warm'"),
])
def test_bad_pool_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"\[pool\]") as info:
        config.load(path)
    assert message in str(info.value)


def test_the_libvirt_backend_brings_its_own_defaults_and_refuses_what_it_cannot_run() -> None:
    default = config.parse("", "c.toml")
    assert default.hypervisor.backend == "qemu" and default.template == "auto"
    chosen = config.parse('[hypervisor]\nbackend = "libvirt"\nlibvirt_uri = "qemu:///x"\n',
                          "c.toml")
    assert chosen.hypervisor.backend == "libvirt" and chosen.hypervisor.libvirt_uri == "qemu:///x"
    assert chosen.hypervisor.machine == "pc" and chosen.template == "off"
    q35 = config.parse('template = "off"\n[hypervisor]\nbackend = "libvirt"\nmachine = "q35"\n',
                       "c.toml")
    assert q35.hypervisor.machine == "q35"
    for text, words in (('[hypervisor]\nbackend = "libvirt"\nmachine = "microvm"\n',
                         ('c.toml [hypervisor]: machine = "microvm"', "PCI")),
                        ('template = "auto"\n[hypervisor]\nbackend = "libvirt"\n',
                         ('c.toml: template = "auto"', "migration stream")),
                        ('[hypervisor]\nbackend = "xen"\n',
                         ("backend must be one of qemu, libvirt",))):
        with pytest.raises(ConfigError) as info:
            config.parse(text, "c.toml")
        assert all(word in str(info.value) for word in words), info.value
        assert "\n" not in str(info.value)
