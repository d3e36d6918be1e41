"""Pods: the CRI plugin (and CRI-O) mark a pod's containers with OCI annotations. The sandbox
(pause) container gets a VM of its own; every other container of the pod names it and joins its
VM, sharing the guest's network (one localhost per pod). What a VM cannot give a pod (the
host's namespaces, mounts propagated back to the host) is refused here, before any VM starts;
the pod's VM is sized from the CRI's sandbox sizing annotations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import NotSupported, SpecError
from ..oci.spec import Spec

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# CRI-O's spelling of the same two annotations.
CRIO_CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"
# The pod's resources (the sum of its containers' limits, as the kubelet computes them) on the
# sandbox container, from containerd 1.6 on: memory in bytes, CPU as a CFS quota and period.
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"


# What the containers of a pod share in its VM besides the guest's network namespace (the
# CRI gives them the sandbox's as paths).
SHARED_NAMESPACES = ("ipc", "uts")
# A pod whose spec leaves one of these namespaces out asks for the host's (the CRI's NODE mode).
HOST_NAMESPACE_FIELDS = {"network": "hostNetwork", "pid": "hostPID", "ipc": "hostIPC"}
SHARED_PROPAGATION = ("shared", "rshared")
REFUSAL = "a VM cannot share"


def is_sandbox(annotations: Mapping[str, str]) -> bool:
    return (annotations.get(CONTAINER_TYPE) == "sandbox"
            or annotations.get(CRIO_CONTAINER_TYPE) == "sandbox")


def is_pod_member(annotations: Mapping[str, str]) -> bool:
    """A pod's sandbox or one of its containers."""
    return any(annotations.get(key) in ("sandbox", "container")
               for key in (CONTAINER_TYPE, CRIO_CONTAINER_TYPE))


def sandbox_of(annotations: Mapping[str, str], container_id: str) -> str | None:
    """The id of the sandbox container whose VM this container joins, or None when it gets
    its own VM (it is a sandbox, or carries no pod annotations)."""
    for kind_key, id_key in ((CONTAINER_TYPE, SANDBOX_ID), (CRIO_CONTAINER_TYPE, CRIO_SANDBOX_ID)):
        if annotations.get(kind_key) == "container":
            sandbox = annotations.get(id_key, "")
            if sandbox and sandbox != container_id:
                return sandbox
    return None


def with_namespace_paths(linux: dict[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    """`linux` with a path on each namespace of a type in `paths` (the pod's, in the guest)."""
    namespaces = [dict(ns, path=paths[ns["type"]]) if ns.get("type") in paths else ns
                  for ns in linux.get("namespaces") or []]
    return {**linux, "namespaces": namespaces}


def refuse_host_sharing(spec: Spec) -> None:
    """One line and NotSupported for what only a shared kernel can do: a pod asking for the
    host's network, pid or ipc namespace, or a bind mount whose mounts would propagate back to
    the host (rshared, the CRI's Bidirectional). Host-to-container propagation (rslave) works:
    the host's mounts reach the guest through the shared directory."""
    if is_pod_member(spec.annotations):
        present = {ns.get("type") for ns in (spec.raw.get("linux") or {}).get("namespaces") or []
                   if isinstance(ns, dict)}
        missing = [field for kind, field in HOST_NAMESPACE_FIELDS.items() if kind not in present]
        if missing:
            raise NotSupported(f"the pod asks for the host's namespaces ({', '.join(missing)}): "
                               f"{REFUSAL} the host's namespaces; run this pod with runc")
    for index, mount in enumerate(spec.mounts):
        if mount.is_bind and any(o in SHARED_PROPAGATION for o in mount.options):
            raise NotSupported(f"mounts[{index}] ({mount.source} on {mount.destination}): rshared "
                               f"propagation back to the host: {REFUSAL} mounts with the host; "
                               "use rslave (host to container) or rprivate")


def _annotation_int(annotations: Mapping[str, str], key: str) -> int | None:
    value = annotations.get(key)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise SpecError(f"annotations[{key!r}]: {value!r} is not an integer") from None
    return number if number > 0 else None


def requested(spec: Spec) -> tuple[int | None, float | None]:
    """(memory bytes, CPUs) the VM is sized for: a pod sandbox's are the whole pod's, from the
    sizing annotations when the CRI gives them (each missing one falls back to the sandbox
    container's own limit); any other container's are its own."""
    if not is_sandbox(spec.annotations):
        return spec.memory_limit, spec.cpus
    memory = _annotation_int(spec.annotations, SANDBOX_MEMORY)
    quota = _annotation_int(spec.annotations, SANDBOX_CPU_QUOTA)
    period = _annotation_int(spec.annotations, SANDBOX_CPU_PERIOD) or 100_000
    cpus = quota / period if quota else None
    return (memory or spec.memory_limit,
            cpus if cpus is not None else spec.cpus)

