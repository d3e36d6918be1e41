"""Drop-in compatibility with runc, through the `runv` CLI: what `runc spec` writes runs, the
seccomp rules generators write load, `exec --cap` applies, `features` tells the truth, mounts
go in the spec's order, linux.cgroupsPath is honoured on the host, and the stand-in (the pid
host tools see) is in the spec's new namespaces."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from runv_py import child
from runv_py.sandbox import cgroup

from .conftest import Runv, reap


def test_a_runc_spec_bundle_runs(runv: Runv, tmp_path: Path) -> None:
    """`runc spec` lists ambient capabilities with no inheritable set: the kernel refuses to
    raise those, runc warns and runs (runv failed with prctl 47: EPERM)."""
    bundle = runv.bundle([])
    (bundle / "config.json").unlink()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["process"]["capabilities"]["ambient"] and \
        "inheritable" not in spec["process"]["capabilities"]
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sh", "-c", "grep -E '^Cap(Eff|Amb)' /proc/self/status"]
    (bundle / "config.json").write_text(json.dumps(spec))
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 0, result.stderr
    # runc spec's three capabilities (AUDIT_WRITE 29, KILL 5, NET_BIND_SERVICE 10), none
    # ambient.
    assert result.stdout == b"CapEff:\t0000000020000420\nCapAmb:\t0000000000000000\n"


def test_seccomp_rule_comparing_one_argument_several_times(runv: Runv) -> None:
    """Several comparisons of one argument in a rule (the runtime-tools default profile does
    that for personality) match when any does, as in runc; runv failed with EINVAL."""
    def edit(spec: dict[str, Any]) -> None:
        spec["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                                   {"index": 0, "value": 0x1234, "op": "SCMP_CMP_EQ"}]}]}
    # linux32 asks for personality 8 (PER_LINUX32), linux64 for 0.
    bundle = runv.bundle(["sh", "-c", "linux64 true && echo 64 ok; linux32 true || echo 32 "
                          "refused"], edit=edit)
    result = runv("run", "--bundle", str(bundle), "c1", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"64 ok\n32 refused\n"


def _cap_eff(text: bytes) -> int:
    return int(next(line for line in text.decode().splitlines()
                    if line.startswith("CapEff:")).split()[1], 16)


def test_exec_cap_is_applied(runv: Runv) -> None:
    caps = ["CAP_KILL"]

    def edit(spec: dict[str, Any]) -> None:
        spec["process"]["capabilities"] = {k: list(caps) for k in
                                           ("bounding", "effective", "permitted")}
    bundle = runv.bundle(["sleep", "600"], edit=edit)
    runv("run", "-d", "--bundle", str(bundle), "c1")
    plain = runv("exec", "c1", "cat", "/proc/self/status")
    assert _cap_eff(plain.stdout) == 1 << 5
    added = runv("exec", "--cap", "CAP_NET_RAW", "--cap", "CAP_SYS_ADMIN", "c1", "cat",
                 "/proc/self/status")
    assert _cap_eff(added.stdout) == (1 << 5) | (1 << 13) | (1 << 21)
    bad = runv("exec", "--cap", "CAP_BOGUS", "c1", "true", check=False)
    assert bad.returncode == 1 and b"--cap CAP_BOGUS: unknown capability" in bad.stderr
    runv("delete", "--force", "c1")


@pytest.mark.parametrize(("settings", "expected"), [
    ('template = "off"\n[hypervisor]\nvcpus = 2\nmemory_mib = 320\nmachine = "pc"\n'
     '[guest]\nshared_fs = "virtio-fs"\nchannel = "serial"\n',
     {"org.runv.shared-fs": "virtio-fs", "org.runv.machine": "pc",
      "org.runv.agent-channel": "serial", "org.runv.vcpus": "2", "org.runv.memory-mib": "320",
      "org.runv.template": "off (cold boot)"}),
    ('[guest]\nshared_fs = "virtio-fs"\n',
     {"org.runv.shared-fs": "9p", "org.runv.shared-fs.cold-boot": "virtio-fs",
      "org.runv.machine": "pc", "org.runv.machine.cold-boot": "microvm",
      "org.runv.agent-channel": "vsock", "org.runv.pool": "not running"}),
])
def test_features_say_what_this_host_and_config_do(runv: Runv, settings: str,
                                                   expected: dict[str, str]) -> None:
    state_line = runv.config.read_text().splitlines()[0]
    runv.config.write_text(state_line + "\n" + settings)
    features = json.loads(runv("features").stdout)
    annotations = features["annotations"]
    assert {k: annotations[k] for k in expected} == expected
    assert annotations["org.runv.accelerator"] in ("tcg", "kvm")
    assert annotations["org.runv.config"] == str(runv.config)
    assert {"rro", "tmpcopyup"} <= set(features["mountOptions"])
    assert features["linux"]["cgroup"]["v1"] and features["linux"]["cgroup"]["v2"]


def test_mounts_in_the_spec_order(runv: Runv, tmp_path: Path) -> None:
    """Nested mounts of mixed kinds: each lands on what the one before it made."""
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "file").write_text("from the volume\n")

    def edit(spec: dict[str, Any]) -> None:
        spec["mounts"] += [
            {"destination": "/a", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
            {"destination": "/a/b", "type": "bind", "source": str(volume),
             "options": ["rbind", "rw"]},
            {"destination": "/a/b/c", "type": "tmpfs", "source": "tmpfs",
             "options": ["size=2m"]},
            {"destination": "/a/d", "type": "tmpfs", "source": "tmpfs", "options": ["size=3m"]},
        ]
    bundle = runv.bundle(["sh", "-c", "cat /a/b/file; awk '$5 ~ /^\\/a/ {print $5}' "
                          "/proc/self/mountinfo; df -k /a/b/c /a/d | awk 'NR>1 {print $2}'"],
                         edit=edit)
    result = runv("run", "--bundle", str(bundle), "c1")
    assert result.stdout == b"from the volume\n/a\n/a/b\n/a/b/c\n/a/d\n2048\n3072\n"


def _sandbox_pids(runv: Runv, cid: str) -> list[int]:
    """The supervisor, everything below it (QEMU, virtiofsd, the vsock backend) and the
    stand-in."""
    return [*child.with_descendants(runv.supervisor_pid(cid)), runv.state_of(cid)["pid"]]


@pytest.mark.parametrize("form", ["absolute", "relative", "systemd"])
def test_cgroups_path_is_honoured_on_the_host(runv: Runv, tmp_path: Path, form: str) -> None:
    name = f"runvtest{os.getpid()}"
    # cgroupsPath, its path in a hierarchy where the runtime is at `base`, the directory
    # the runtime makes there (and must remove).
    cgroups_path, expected_path, made = {
        "absolute": (f"/{name}/c1", lambda base: f"/{name}/c1", lambda base: f"/{name}"),
        "relative": (f"{name}/c1", lambda base: f"{base.rstrip('/')}/{name}/c1",
                     lambda base: f"{base.rstrip('/')}/{name}"),
        "systemd": (f"{name}.slice:runv:c1", lambda base: f"/{name}.slice/runv-c1.scope",
                    lambda base: f"/{name}.slice"),
    }[form]
    memory_limit = 96 << 20

    def edit(spec: dict[str, Any]) -> None:
        spec["linux"]["cgroupsPath"] = cgroups_path
        spec["linux"]["resources"] = {"memory": {"limit": memory_limit},
                                      "cpu": {"quota": 50000, "period": 100000,
                                              "shares": 512},
                                      "pids": {"limit": 1000}}
    bundle = runv.bundle(["sleep", "600"], edit=edit)
    mine = cgroup.memberships()
    roots = cgroup.roots(mine)
    runv("create", "--bundle", str(bundle), "c1")
    pids = _sandbox_pids(runv, "c1")
    assert len(pids) >= 4, pids  # supervisor, QEMU, vsock backend, stand-in at least
    for pid in pids:
        got = cgroup.memberships(pid)
        assert got == {k: expected_path(mine[k]) for k in roots}, (pid, got)
    from runv_py.sandbox import host_cgroup  # after what the old code already fails

    vm_mib = 256 + math.ceil(memory_limit / (1 << 20))
    overhead = host_cgroup.HOST_OVERHEAD_MIB + host_cgroup.TCG_CODE_CACHE_MIB
    for controllers, root in roots.items():
        directory = root / expected_path(mine[controllers]).lstrip("/")
        names = set(controllers.split(","))
        if "memory" in names:
            assert int((directory / "memory.limit_in_bytes").read_text()) == \
                (vm_mib + overhead) << 20
        if "cpu" in names:
            assert (directory / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (directory / "cpu.cfs_period_us").read_text().strip() == "100000"
            assert (directory / "cpu.shares").read_text().strip() == "512"
        if "pids" in names:
            assert (directory / "pids.max").read_text().strip() == "1000"
    runv("start", "c1")
    runv("delete", "--force", "c1")
    for controllers, root in roots.items():
        top = root / made(mine[controllers]).lstrip("/")
        assert not top.exists(), f"{top} left behind"


def test_cgroup_of_a_killed_supervisor_is_removed_by_delete(runv: Runv) -> None:
    name = f"runvtest{os.getpid()}k"

    def edit(spec: dict[str, Any]) -> None:
        spec["linux"]["cgroupsPath"] = f"/{name}"
    runv("create", "--bundle", str(runv.bundle(["sleep", "600"], edit=edit)), "c1")
    standin = runv.state_of("c1")["pid"]
    roots = cgroup.roots(cgroup.memberships())
    assert all((root / name).is_dir() for root in roots.values())
    os.kill(runv.supervisor_pid("c1"), signal.SIGKILL)
    reap(standin)  # the stand-in loses its supervisor
    runv.wait_status("c1", "stopped")
    assert all((root / name).is_dir() for root in roots.values())
    runv("delete", "c1")
    deadline = time.monotonic() + 10
    while any((root / name).exists() for root in roots.values()):
        assert time.monotonic() < deadline, "the killed supervisor's cgroup is left"
        time.sleep(0.1)


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_the_standin_is_in_the_new_namespaces_of_the_spec(runv: Runv, tmp_path: Path) -> None:
    netns = f"runvtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        def edit(spec: dict[str, Any]) -> None:
            spec["linux"]["namespaces"] = [
                {"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")] + [
                {"type": "network", "path": f"/run/netns/{netns}"}]
        pid_file = tmp_path / "init.pid"
        runv("create", "--bundle", str(runv.bundle(["sleep", "600"], edit=edit)),
             "--pid-file", str(pid_file), "c1")
        pid = int(pid_file.read_text())
        assert _ns(pid, "net") == f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
        for kind in ("ipc", "uts", "mnt", "cgroup", "pid"):
            assert _ns(pid, kind) != _ns("self", kind), kind
        assert _ns(pid, "user") == _ns("self", "user")  # not asked for
        # In its new pid namespace the stand-in is pid 1 (as runc's init is).
        status = Path(f"/proc/{pid}/status").read_text()
        assert next(line for line in status.splitlines()
                    if line.startswith("NSpid:")).split()[-1] == "1"
        runv("start", "c1")
        exec_pid_file = tmp_path / "exec.pid"
        runv("exec", "--detach", "--pid-file", str(exec_pid_file), "c1", "sleep", "600")
        exec_pid = int(exec_pid_file.read_text())
        for kind in ("net", "ipc", "uts", "mnt", "cgroup", "pid"):
            assert _ns(exec_pid, kind) == _ns(pid, kind), kind
        runv("delete", "--force", "c1")
        reap(exec_pid)
        reap(pid)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
