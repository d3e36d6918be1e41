"""Kubernetes' view of runv: containerd's CRI plugin drives the runv RuntimeClass handler
(io.containerd.runv.v2) next to runc on one node, through crictl and the CRI validation suite
(critest, cri-tools v1.26.1). The rule: every spec that passes under runc passes under runv,
except those that need the host's namespaces, which must fail with runv's one-line refusal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runv_py.config import RuntimeConfig
from tests.cri import critest
from tests.cri.conftest import Node

POD = {"metadata": {"name": "crictl-pod", "namespace": "runv", "uid": "crictl-pod-uid",
                    "attempt": 1},
       "linux": {"security_context": {"namespace_options": {"pid": 0}}}}
# Sized by the CRI's pod resources (containerd 1.6 writes them as the sandbox annotations).
SIZED_POD = {**POD, "metadata": {**POD["metadata"], "name": "sized-pod", "uid": "sized-uid"},
             "linux": {"resources": {"memory_limit_in_bytes": 192 << 20,
                                     "cpu_period": 100000, "cpu_quota": 150000}}}
CONTAINER = {"metadata": {"name": "sh"}, "image": {"image":
             "registry.k8s.io/e2e-test-images/busybox:1.29-2"},
             "command": ["sleep", "600"]}
EXEC_STDIN_TRIES = 20
STOP_TIMEOUT_S = 40


def _write(path: Path, doc: dict[str, object]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _crictl_round(node: Node, handler: str, work: Path) -> dict[str, object]:
    """A pod and a container through crictl, piped `exec -i` repeated (it once lost its stdin
    about once in 80 under runv), then stop and removal; returns what was seen."""
    pod_json = _write(work / f"pod-{handler}.json", POD)
    ctr_json = _write(work / f"ctr-{handler}.json", CONTAINER)
    pod = node.crictl("runp", "--runtime", handler, str(pod_json)).stdout.decode().strip()
    try:
        cid = node.crictl("create", pod, str(ctr_json), str(pod_json)).stdout.decode().strip()
        node.crictl("start", cid)
        echoed = [node.crictl("exec", "-i", cid, "cat", input=f"line {i}\n".encode())
                  .stdout.decode() for i in range(EXEC_STDIN_TRIES)]
        # `sleep` has no SIGTERM handler: it stops at once unless it is its pid namespace's
        # PID 1, which ignores such signals (the pod's pid namespace makes pause PID 1).
        started = time.monotonic()
        stop = node.crictl("stop", "--timeout", str(STOP_TIMEOUT_S), cid, check=False)
        stop_s = time.monotonic() - started
        state = json.loads(node.crictl("inspect", cid).stdout)["status"]["state"]
        return {"echoed": echoed, "stop": stop.returncode, "stop_s": stop_s, "state": state}
    finally:
        node.crictl("stopp", pod, check=False)
        node.crictl("rmp", pod, check=False)


def _guest_size(node: Node, work: Path) -> tuple[int, int]:
    """(MiB of memory, CPUs) a container of SIZED_POD sees under runv: its VM's."""
    pod_json = _write(work / "sized-pod.json", SIZED_POD)
    ctr_json = _write(work / "sized-ctr.json", CONTAINER)
    pod = node.crictl("runp", "--runtime", "runv", str(pod_json)).stdout.decode().strip()
    try:
        cid = node.crictl("create", pod, str(ctr_json), str(pod_json)).stdout.decode().strip()
        node.crictl("start", cid)
        out = node.crictl("exec", cid, "sh", "-c", "grep MemTotal /proc/meminfo; nproc")
        memory, cpus = out.stdout.decode().split("\n")[:2]
        return int(memory.split()[1]) // 1024, int(cpus)
    finally:
        node.crictl("stopp", pod, check=False)
        node.crictl("rmp", pod, check=False)


@pytest.mark.timeout(3600)
def test_runv_passes_the_cri_validation_suite_that_runc_passes(node: Node,
                                                               tmp_path: Path) -> None:
    tools = node.tools
    # crictl first: the shapes a user meets, on both handlers.
    node.crictl("pull", CONTAINER["image"]["image"])  # type: ignore[index]
    seen, took = {}, {}
    for handler in ("runc", "runv"):
        started = time.monotonic()
        seen[handler] = _crictl_round(node, handler, tmp_path)
        took[f"crictl {handler}"] = time.monotonic() - started
    for handler, round_ in seen.items():
        assert round_["echoed"] == [f"line {i}\n" for i in range(EXEC_STDIN_TRIES)], (
            handler, round_)
        assert round_["stop"] == 0 and round_["state"] == "CONTAINER_EXITED", (handler, round_)
        assert round_["stop_s"] < STOP_TIMEOUT_S / 2, (handler, round_)  # SIGTERM did it
    # The pod's resources size its VM: the guest overhead plus 192 MiB, 2 vCPUs for 1.5 CPUs.
    started = time.monotonic()
    memory_mib, cpus = _guest_size(node, tmp_path)
    took["sized pod (runv)"] = time.monotonic() - started
    base = RuntimeConfig().hypervisor.memory_mib
    assert base + 192 - 64 < memory_mib <= base + 192 and cpus == min(2, os.cpu_count() or 1), (
        memory_mib, cpus)

    runs = [critest.run(tools / "critest", node.endpoint, handler, tmp_path)
            for handler in ("runc", "runv")]
    runc, runv = runs
    print("\n" + critest.table(runs))
    took.update({f"critest {r.handler}": r.seconds for r in runs})
    print("durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()))
    assert runc.passed >= 70, f"runc itself fails: see {runc.log}"
    problems = []
    for name, result in runc.results.items():
        theirs = runv.results.get(name)
        host_only = critest.spec_title(name) in critest.HOST_NAMESPACE_SPECS
        if host_only:
            if theirs is None or theirs.passed or critest.REFUSAL not in theirs.message:
                problems.append(f"{name}: should fail with runv's refusal, got "
                                f"{theirs.status if theirs else 'nothing'}: "
                                f"{theirs.message[:300] if theirs else ''}")
        elif result.passed and (theirs is None or not theirs.passed):
            problems.append(f"{name}: passes under runc, not runv: "
                            f"{theirs.message[:600] if theirs else 'not run'}")
    assert not problems, "\n".join(problems) + f"\n(logs: {runv.log})"
