"""What a sandbox gets from its container's spec and the runtime config: the VM's size, whether
it starts from a template, how shares reach the guest, and the `org.runv.*` annotations that
change these. Both the supervisor's clients (which claim pooled VMs by size) and the supervisor
(which boots them) decide with these functions, so they always agree."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .. import runtime_annotations
from ..config import RuntimeConfig
from ..devices import ShareDriver
from ..errors import SpecError
from ..oci.spec import Spec
from ..runtime_annotations import check as check_annotations
from . import pod

# virtio-fs or 9p for this container's shares (virtio-fs means a cold boot: template clones
# serve shares over 9p).
SHARED_FS_ANNOTATION = runtime_annotations.SHARED_FS
# auto or off: overrides the runtime config's `template`.
TEMPLATE_ANNOTATION = runtime_annotations.TEMPLATE
# {"lower": [dirs, topmost first], "upper": dir, "work": dir}: the container's rootfs is an
# overlayfs of these (hyperctl: a writable layer over an image), mounted by the supervisor in
# its private mount namespace instead of binding root.path.
ROOTFS_OVERLAY_ANNOTATION = runtime_annotations.ROOTFS_OVERLAY
# {"image": file, "disk": file[, "image_fstype": "erofs"]}: the container's rootfs is an
# overlayfs, in the guest, of the image file (read-only) under the disk file (an ext4: the
# writable layer), both virtio-blk devices (docs/block-rootfs.md); root.path is not used.
ROOTFS_BLOCK_ANNOTATION = runtime_annotations.ROOTFS_BLOCK
# Informational, written by hyperctl: the image a container runs, and its labels.
IMAGE_ANNOTATION = "org.runv.image"
LABEL_ANNOTATION_PREFIX = "org.runv.label."

MEMORY_CAP_MIB = 64 * 1024


@dataclass(frozen=True, slots=True)
class Sizing:
    """A VM's size from its containers' limits: the configured guest overhead (memory_mib,
    vcpus) plus what they ask for. Used when the VM boots and when it is resized."""

    memory_mib: int
    vcpus: int

    def of(self, limits: Iterable[tuple[int | None, float | None]]) -> tuple[int, int]:
        """(memory MiB, vCPUs) for containers with these (memory bytes, CPUs) limits,
        uncapped: the overhead plus the sum of the memory limits, and the CPUs rounded up
        (never fewer than the overhead's vCPUs)."""
        limits = list(limits)
        memory = self.memory_mib + sum(math.ceil(m / (1 << 20)) for m, _ in limits if m)
        cpus = sum(c for _, c in limits if c)
        return memory, max(self.vcpus, math.ceil(cpus))


def sized(config: RuntimeConfig, spec: Spec) -> RuntimeConfig:
    """The VM gets what the container (a pod sandbox: the whole pod) asked for plus the
    configured guest overhead, within MEMORY_CAP_MIB and the host's CPUs."""
    hv = config.hypervisor
    memory, vcpus = Sizing(hv.memory_mib, hv.vcpus).of([pod.requested(spec)])
    memory = min(MEMORY_CAP_MIB, memory) if memory > hv.memory_mib else memory
    vcpus = min(os.cpu_count() or 1, vcpus) if vcpus > hv.vcpus else vcpus
    return replace(config, hypervisor=replace(hv, memory_mib=memory, vcpus=vcpus))


def shared_fs_name(config: RuntimeConfig, spec: Spec) -> str:
    """"virtio-fs" or "9p": the annotation, else the config's [guest] shared_fs."""
    choice = spec.annotations.get(SHARED_FS_ANNOTATION, config.guest.shared_fs)
    if choice not in ("virtio-fs", "9p"):
        raise SpecError(f"annotations[{SHARED_FS_ANNOTATION!r}]: {choice!r} is not "
                        "virtio-fs or 9p")
    return choice


def shared_fs_driver(config: RuntimeConfig, spec: Spec) -> ShareDriver:
    return "virtiofs" if shared_fs_name(config, spec) == "virtio-fs" else "9p"


def driver_name(driver: ShareDriver) -> str:
    """The annotation's spelling of a share driver."""
    return "virtio-fs" if driver == "virtiofs" else "9p"


def template_choice(config: RuntimeConfig, spec: Spec) -> RuntimeConfig:
    """The org.runv.template annotation overrides the config's `template`; asking for
    virtio-fs by annotation means a cold boot (a template's clones serve shares over 9p)."""
    choice = spec.annotations.get(TEMPLATE_ANNOTATION, config.template)
    if choice not in ("auto", "off"):
        raise SpecError(f"annotations[{TEMPLATE_ANNOTATION!r}]: {choice!r} is not auto or off")
    if choice == "off" or spec.annotations.get(SHARED_FS_ANNOTATION) == "virtio-fs":
        return replace(config, template="off")
    return replace(config, template="auto")


def sandbox_config(config: RuntimeConfig, spec: Spec) -> RuntimeConfig:
    """The config a sandbox for this container boots with: sized, template chosen."""
    return template_choice(sized(config, spec), spec)


def admit(enabled: tuple[str, ...], spec: Spec, source: str = "config.toml") -> None:
    """SpecError unless the spec's runtime-changing annotations are ones `enabled` (the
    config's enable_annotations) names, and a rootfs overlay is in a bundle hyperctl wrote
    (runv_py/runtime_annotations.py). The supervisor calls it for every spec it is handed."""
    check_annotations(spec.annotations, enabled, spec.bundle, source)
