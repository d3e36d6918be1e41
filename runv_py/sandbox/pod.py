"""Pods: the CRI plugin (and CRI-O) mark a pod's containers with OCI annotations. The sandbox
(pause) container gets a VM of its own; every other container of the pod names it and joins its
VM, sharing the guest's network (one localhost per pod)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
# CRI-O's spelling of the same two annotations.
CRIO_CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"


# What the containers of a pod share in its VM besides the guest's network namespace (the
# CRI gives them the sandbox's as paths).
SHARED_NAMESPACES = ("ipc", "uts")


def is_sandbox(annotations: Mapping[str, str]) -> bool:
    return (annotations.get(CONTAINER_TYPE) == "sandbox"
            or annotations.get(CRIO_CONTAINER_TYPE) == "sandbox")


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
