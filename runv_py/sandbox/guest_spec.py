"""The bundle's config.json rewritten for the guest: paths on the host become paths in the
sandbox's shared directory as the guest mounts it, and what the host does itself is removed
(runtime-namespace hooks, host namespace paths)."""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..oci.spec import HOST_HOOKS, Spec

log = logging.getLogger(__name__)

SHARED_TAG = "runvshared"
GUEST_SHARED = "/run/hyperstart/storage/shared"
GUEST_CONTAINERS = "/run/hyperstart/containers"  # the agent's directory of each container


def pid_namespace(container_id: str) -> str:
    """Where the agent keeps the pid namespace of a container that has one of its own: a
    pod's containers join its sandbox's there (one pid namespace per pod, as with runc)."""
    return f"{GUEST_CONTAINERS}/{container_id}/ns/pid"


def rewrite(spec: Spec, binds: dict[int, str], rootfs: str = "rootfs",
            joined: dict[str, str] | None = None, root_path: str = "") -> dict[str, Any]:
    """`binds` maps the index of each bind mount in spec.mounts to its name in the share;
    `rootfs` is the name of the container's root there, unless `root_path` gives the root's
    guest path (a block rootfs). A namespace whose type is in `joined`
    and that the spec gives a path (a pod's shared namespace, as the CRI names it) becomes
    the guest namespace at joined[type]; other paths are dropped (a new namespace)."""
    raw = copy.deepcopy(spec.raw)
    raw["root"] = {"path": root_path or f"{GUEST_SHARED}/{rootfs}",
                   "readonly": spec.readonly_root}
    mounts = raw.get("mounts") or []
    for index, name in binds.items():
        mounts[index]["source"] = f"{GUEST_SHARED}/{name}"
    hooks = raw.get("hooks")
    if isinstance(hooks, dict):
        for kind in HOST_HOOKS:
            hooks.pop(kind, None)
        if hooks.pop("createContainer", None):
            log.warning("hooks.createContainer: not run (a VM has no host-side container "
                        "namespace to run them in; use startContainer)")
    linux = raw.get("linux") or {}
    namespaces = []
    for ns in linux.get("namespaces") or []:
        # The guest is the sandbox: its network is the VM's, shared by all the containers of
        # a pod (one localhost); a host path names nothing there.
        if ns.get("type") == "network":
            continue
        if ns.get("path") and ns["type"] in (joined or {}):
            namespaces.append({"type": ns["type"], "path": (joined or {})[ns["type"]]})
        else:
            namespaces.append({"type": ns["type"]})
    if not any(ns["type"] == "mount" for ns in namespaces):
        # The container is always in a mount namespace of its own in the guest (its rootfs
        # is pivoted into): asking for none (sharing the runtime's) cannot mean the host's.
        namespaces.append({"type": "mount"})
    linux["namespaces"] = namespaces
    raw["linux"] = linux
    # The host applies cgroupsPath to the sandbox's host processes (host_cgroup.py); in the
    # guest the container's cgroup is the agent's choice.
    linux.pop("cgroupsPath", None)
    # cpuset cpus and mems name the host's CPUs and memory nodes: they pin the VM there (the
    # host cgroup); in the guest, numbers mean vCPUs, of which the VM may have fewer.
    cpu = (linux.get("resources") or {}).get("cpu")
    if isinstance(cpu, dict):
        cpu.pop("cpus", None)
        cpu.pop("mems", None)
    _warn_differences(raw)
    return raw


def _warn_differences(raw: dict[str, Any]) -> None:
    """One warning line for what the guest does differently from runc with this spec."""
    linux = raw.get("linux") or {}
    if linux.get("devices"):
        log.warning("linux.devices: nodes are made in the guest with these numbers and name "
                    "the guest's devices; host devices are not passed into the VM (as Kata's "
                    "privileged_without_host_devices)")
    caps = (raw.get("process") or {}).get("capabilities") or {}
    ambient = set(caps.get("ambient") or [])
    skipped = ambient - (set(caps.get("inheritable") or []) & set(caps.get("permitted") or []))
    if skipped:
        log.warning("process.capabilities.ambient: %s not raised (an ambient capability must "
                    "also be permitted and inheritable)", ", ".join(sorted(skipped)))
