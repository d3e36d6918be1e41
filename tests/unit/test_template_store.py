"""Template logic without a VM: keys, the store's layout and locking, the clone's argv, the
config and annotation that choose the path."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import config
from runv_py.devices import Share
from runv_py.errors import ConfigError, SpecError
from runv_py.oci import spec as oci_spec
from runv_py.sandbox import policy, vm_template
from runv_py.vm.qemu.cmdline import VmConfig, qemu_argv


def _vm(tmp_path: Path, **overrides: object) -> VmConfig:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    base: dict[str, object] = dict(
        name="t1", qemu="/bin/true", machine="pc", accel="tcg", vcpus=1, memory_mib=256,
        kernel=kernel, kernel_cmdline="console=ttyS0", console_log=tmp_path / "console.log",
        qmp_socket=tmp_path / "qmp.sock", agent_socket=tmp_path / "agent.sock")
    base.update(overrides)
    return VmConfig(**base)  # type: ignore[arg-type]


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_key_follows_every_input(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    key = vm_template.inputs_for(vm, "0.1.0", "serial").key
    assert vm_template.inputs_for(vm, "0.1.0", "serial").key == key
    assert vm_template.inputs_for(replace(vm, memory_mib=512), "0.1.0", "serial").key != key
    assert vm_template.inputs_for(replace(vm, vcpus=2), "0.1.0", "serial").key != key
    assert vm_template.inputs_for(vm, "0.2.0", "serial").key != key
    shared = replace(vm, shares=(Share("runvshared", Path("/elsewhere")),))
    assert vm_template.inputs_for(shared, "0.1.0", "serial").key != key
    # The directory behind a share is the clone's own: it is not an input.
    moved = replace(vm, shares=(Share("runvshared", Path("/other")),))
    assert vm_template.inputs_for(moved, "0.1.0", "serial").key == \
        vm_template.inputs_for(shared, "0.1.0", "serial").key
    (tmp_path / "vmlinux").write_bytes(b"rebuilt kernel")
    assert vm_template.inputs_for(vm, "0.1.0", "serial").key != key


def test_clone_argv_maps_the_template_privately_and_waits_for_its_state(tmp_path: Path) -> None:
    saved = vm_template.Template("abc", tmp_path / "abc")
    clone = qemu_argv(vm_template.clone_vm(saved, _vm(tmp_path)))
    assert (f"memory-backend-file,id=mem,size=256M,mem-path={saved.memory},share=off"
            in _pairs(clone, "-object"))
    assert "memory-backend=mem" in _pairs(clone, "-machine")[0]
    assert clone[clone.index("-incoming") + 1] == "defer" and "-S" in clone
    vmgenid = [d for d in _pairs(clone, "-device") if d.startswith("vmgenid,guid=")]
    again = qemu_argv(vm_template.clone_vm(saved, _vm(tmp_path)))
    assert len(vmgenid) == 1 and vmgenid[0] not in _pairs(again, "-device")
    source = _vm(tmp_path, memory_file=tmp_path / "m", memory_file_shared=True)
    assert f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path / 'm'},share=on" \
        in _pairs(qemu_argv(source), "-object")


def test_a_private_clone_cannot_carry_vhost_user_devices(tmp_path: Path) -> None:
    vm = _vm(tmp_path, shared_memory=True, memory_file=tmp_path / "m")
    with pytest.raises(ValueError, match="shared guest memory"):
        qemu_argv(vm)


def _publish(root: Path, key: str) -> vm_template.Template:
    path = root / key
    path.mkdir(parents=True)
    for name in (vm_template.MEMORY, vm_template.STATE):
        (path / name).write_bytes(b"x")
    (path / vm_template.META).write_text(json.dumps({"key": key, "inputs": {}}))
    return vm_template.Template(key, path)


def test_store_lists_finds_and_removes(tmp_path: Path) -> None:
    store = vm_template.TemplateStore(tmp_path)
    assert store.templates() == []
    first = _publish(tmp_path, "aaaa1111")
    _publish(tmp_path, "aaaa2222")
    (tmp_path / "bbbb").mkdir()  # incomplete: not a template
    assert [t.key for t in store.templates()] == ["aaaa1111", "aaaa2222"]
    assert store.find("aaaa1").key == "aaaa1111"
    with pytest.raises(ConfigError, match="2 templates"):
        store.find("aaaa")
    with pytest.raises(ConfigError, match="no template"):
        store.find("bbbb")
    store.remove(first)
    assert [t.key for t in store.templates()] == ["aaaa2222"]
    assert not any(p.name.startswith(".removed") for p in tmp_path.iterdir())
    store.remove(first)  # idempotent


def test_sweep_removes_dead_builders_work_but_not_a_live_one(tmp_path: Path) -> None:
    store = vm_template.TemplateStore(tmp_path)
    dead = tmp_path / ".build-dead0000-x1"
    live = tmp_path / ".build-live0000-x2"
    dead.mkdir()
    live.mkdir()

    async def main() -> None:
        async with store.lock("live0000"):
            other = vm_template.TemplateStore(tmp_path)
            other.sweep()

    asyncio.run(main())
    assert not dead.exists() and live.exists()


def test_config_template_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNV_TEMPLATE_DIR", raising=False)
    monkeypatch.delenv("RUNV_ASSETS_DIR", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('template = "off"\ntemplate_dir = "/t"\n')
    loaded = config.load(path)
    assert loaded.template == "off" and loaded.template_dir == Path("/t")
    assert config.RuntimeConfig().template == "auto"
    monkeypatch.setenv("RUNV_TEMPLATE_DIR", "/env")
    assert config.load(path).template_dir == Path("/env")
    path.write_text('template = "sometimes"\n')
    with pytest.raises(ConfigError, match="template must be one of auto, off"):
        config.load(path)


def _spec(tmp_path: Path, annotations: dict[str, str]) -> oci_spec.Spec:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({
        "ociVersion": "1.1.0", "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/"}, "annotations": annotations}))
    return oci_spec.load(tmp_path)


def test_annotation_chooses_the_path(tmp_path: Path) -> None:
    base = config.RuntimeConfig()
    assert policy.template_choice(base, _spec(tmp_path, {})).template == "auto"
    off = {policy.TEMPLATE_ANNOTATION: "off"}
    assert policy.template_choice(base, _spec(tmp_path, off)).template == "off"
    virtiofs = {policy.SHARED_FS_ANNOTATION: "virtio-fs"}
    assert policy.template_choice(base, _spec(tmp_path, virtiofs)).template == "off"
    cold = replace(base, template="off")
    assert policy.template_choice(cold, _spec(tmp_path, {})).template == "off"
    with pytest.raises(SpecError, match=r"org\.runv\.template"):
        policy.template_choice(base, _spec(tmp_path, {policy.TEMPLATE_ANNOTATION: "x"}))


def test_prune_removes_templates_of_assets_that_changed(tmp_path: Path) -> None:
    store = vm_template.TemplateStore(tmp_path / "store")
    vm = _vm(tmp_path)
    kept = _publish(store.root, "kept0000")
    gone = _publish(store.root, "gone0000")
    inputs = vm_template.inputs_for(vm, "0.1.0", "serial")
    for saved in (kept, gone):
        (saved.root / vm_template.META).write_text(json.dumps({"inputs": {
            "qemu": inputs.qemu, "kernel": inputs.kernel, "root_image": "", "initrd": ""}}))
    (tmp_path / "vmlinux").write_bytes(b"rebuilt")
    kernel_now = vm_template.inputs_for(vm, "0.1.0", "serial").kernel
    (kept.root / vm_template.META).write_text(json.dumps({"inputs": {
        "qemu": inputs.qemu, "kernel": kernel_now}}))
    assert store.prune_stale() == ["gone0000"]
    assert [t.key for t in store.templates()] == ["kept0000"]
