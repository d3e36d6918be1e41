"""What a pod may ask of runv (runv_py/sandbox/pod.py): host namespaces and mount propagation
back to the host are refused with one line; the pod's VM is sized from the CRI's sandbox
sizing annotations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from runv_py.config import RuntimeConfig
from runv_py.errors import NotSupported, SpecError
from runv_py.oci import spec as oci_spec
from runv_py.sandbox import pod
from runv_py.sandbox.policy import sized

ALL = ("pid", "network", "ipc", "uts", "mount")


def _spec(tmp_path: Path, *, kind: str | None = "sandbox", namespaces: tuple[str, ...] = ALL,
          mounts: list[dict[str, Any]] | None = None, annotations: dict[str, str] | None = None,
          resources: dict[str, Any] | None = None) -> oci_spec.Spec:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    notes = dict(annotations or {})
    if kind is not None:
        notes[pod.CONTAINER_TYPE] = kind
        notes[pod.SANDBOX_ID] = "sb"
    linux: dict[str, Any] = {"namespaces": [{"type": t} for t in namespaces]}
    if resources is not None:
        linux["resources"] = resources
    return oci_spec.parse(tmp_path, {
        "ociVersion": "1.1.0", "root": {"path": "rootfs"},
        "process": {"args": ["sh"], "cwd": "/"}, "mounts": mounts or [],
        "annotations": notes, "linux": linux})


@pytest.mark.parametrize(("left_out", "field"), [
    (("network",), "hostNetwork"), (("pid",), "hostPID"), (("ipc",), "hostIPC"),
    (("network", "ipc"), "hostNetwork, hostIPC")])
@pytest.mark.parametrize("kind", ["sandbox", "container"])
def test_host_namespaces_are_refused_for_pods(tmp_path: Path, left_out: tuple[str, ...],
                                              field: str, kind: str) -> None:
    spec = _spec(tmp_path, kind=kind, namespaces=tuple(t for t in ALL if t not in left_out))
    with pytest.raises(NotSupported) as caught:
        pod.refuse_host_sharing(spec)
    message = str(caught.value)
    assert f"({field})" in message and pod.REFUSAL in message and "\n" not in message


def test_a_pod_with_its_own_namespaces_and_a_non_pod_without_them_pass(tmp_path: Path) -> None:
    pod.refuse_host_sharing(_spec(tmp_path))
    # Outside a pod (runv under podman with --network host) the guest's namespace serves.
    pod.refuse_host_sharing(_spec(tmp_path, kind=None, namespaces=("mount",)))


@pytest.mark.parametrize("option", ["rshared", "shared"])
def test_shared_propagation_of_a_bind_mount_is_refused(tmp_path: Path, option: str) -> None:
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/data", "type": "bind", "source": "/srv/data",
               "options": ["rbind", option]}]
    with pytest.raises(NotSupported, match=r"^mounts\[1\] \(/srv/data on /data\): rshared"):
        pod.refuse_host_sharing(_spec(tmp_path, kind=None, mounts=mounts))


@pytest.mark.parametrize("option", ["rslave", "rprivate", "slave"])
def test_other_propagation_passes(tmp_path: Path, option: str) -> None:
    mounts = [{"destination": "/data", "type": "bind", "source": "/srv/data",
               "options": ["rbind", option]}]
    pod.refuse_host_sharing(_spec(tmp_path, mounts=mounts))


def test_a_pod_vm_is_sized_from_the_sandbox_annotations(tmp_path: Path) -> None:
    config = RuntimeConfig()
    base = config.hypervisor.memory_mib
    spec = _spec(tmp_path, annotations={pod.SANDBOX_MEMORY: str(512 << 20),
                                        pod.SANDBOX_CPU_QUOTA: "150000",
                                        pod.SANDBOX_CPU_PERIOD: "100000"},
                 resources={"cpu": {"shares": 2}})
    assert pod.requested(spec) == (512 << 20, 1.5)
    vm = sized(config, spec).hypervisor
    assert vm.memory_mib == base + 512
    assert vm.vcpus == min(2, os.cpu_count() or 1)


def test_sizing_falls_back_to_the_container_and_ignores_zero(tmp_path: Path) -> None:
    own = {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000}}
    # containerd writes 0 for "no limit".
    spec = _spec(tmp_path, annotations={pod.SANDBOX_MEMORY: "0", pod.SANDBOX_CPU_QUOTA: "0"},
                 resources=own)
    assert pod.requested(spec) == (64 << 20, 0.5)
    # The annotations are the whole pod's only on its sandbox.
    member = _spec(tmp_path, kind="container", annotations={pod.SANDBOX_MEMORY: "999999999"},
                   resources=own)
    assert pod.requested(member) == (64 << 20, 0.5)


def test_a_bad_sizing_annotation_names_the_field(tmp_path: Path) -> None:
    spec = _spec(tmp_path, annotations={pod.SANDBOX_MEMORY: "lots"})
    with pytest.raises(SpecError, match=r"io\.kubernetes\.cri\.sandbox-memory"):
        pod.requested(spec)
