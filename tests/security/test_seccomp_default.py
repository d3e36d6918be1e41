"""Boundary: the guest kernel's system calls. hyperctl and the Python API gave containers no
seccomp profile, so a container could call everything its capabilities allow, open AF_VSOCK
sockets (the family of the agent's own channel) and AF_ALG ones. They now apply docker's default
profile (seccomp_profile.py), `--security-opt seccomp=PATH|unconfined` (and the API's `seccomp`
argument) to change it.

- the profile's content for docker's default capabilities, and for more;
- the profile loaded by the agent's own compiler in a real kernel (the host's), asked by real
  calls; and in a real guest through the agent;
- hyperctl's default, the flag, a profile file, and the API."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hyperstart_agent.container import seccomp as agent_seccomp

from runv_py import config
from runv_py.api import Sandbox as ApiSandbox
from runv_py.devices import Share
from runv_py.errors import ConfigError
from runv_py.sandbox.guest_vm import GuestVm
from runv_py.workload import options as opt
from runv_py.workload import seccomp_profile
from runv_py.workload.bundle import CAPABILITIES
from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401
from tests.security.guest import (  # noqa: F401
    SHARE_TAG,
    collect,
    python_rootfs,
    python_spec,
    run_script,
    storages,
)
from tests.vm.conftest import runtime_config  # noqa: F401


def _allowed(profile: dict[str, object]) -> set[str]:
    """Names allowed whatever the arguments."""
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    return {n for r in rules if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
            for n in r["names"]}


def test_the_default_profile_for_dockers_capabilities() -> None:
    profile = seccomp_profile.default_profile(CAPABILITIES, "x86_64")
    assert (profile["defaultAction"], profile["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 1)
    # Only the ABI the guest kernel runs (no IA32 emulation, no x32: test_guest_kernel.py).
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]
    allowed = _allowed(profile)
    for name in ("read", "openat", "execve", "pipe2", "wait4", "clock_gettime", "arch_prctl",
                 "chroot", "ptrace", "epoll_pwait", "mknodat", "getpid"):
        assert name in allowed, name
    # What the capabilities do not give, or nobody needs: refused whatever root may do.
    for name in ("mount", "umount2", "unshare", "setns", "bpf", "perf_event_open", "keyctl",
                 "add_key", "request_key", "init_module", "finit_module", "kexec_load",
                 "reboot", "swapon", "acct", "open_by_handle_at", "io_uring_setup",
                 "userfaultfd", "clone3", "socket", "personality", "clone", "syslog"):
        assert name not in allowed, name
    # socket: every family but AF_ALG (38) and AF_VSOCK (40), one comparison per rule (a
    # rule's comparisons must all hold, and libseccomp refuses two of one argument).
    rules = [r for r in profile["syscalls"] if r.get("args")]
    for rule in rules:
        indexes = [a["index"] for a in rule["args"]]
        assert len(indexes) == len(set(indexes)), rule
    socket_rules = [r["args"][0] for r in rules if r["names"] == ["socket"]]

    def socket_allowed(family: int) -> bool:
        ops = {"SCMP_CMP_LT": int.__lt__, "SCMP_CMP_EQ": int.__eq__, "SCMP_CMP_GT": int.__gt__}
        return any(ops[a["op"]](family, a["value"]) for a in socket_rules)

    assert [f for f in range(64) if not socket_allowed(f)] == [38, 40]
    assert {r["args"][0]["value"] for r in rules if r["names"] == ["personality"]} == {
        0, 8, 0x20000, 0x20008, 0xFFFFFFFF}
    # clone without namespace flags; clone3 says ENOSYS so that libc falls back to clone.
    assert [r["args"][0] for r in rules if r["names"] == ["clone"]] == [
        {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS} in \
        profile["syscalls"]
    # The agent's parser takes it as it is.
    assert agent_seccomp.parse(profile) is not None


def test_capabilities_widen_the_profile_as_dockers() -> None:
    admin = seccomp_profile.default_profile(("CAP_SYS_ADMIN",), "x86_64")
    assert {"mount", "unshare", "setns", "clone", "clone3", "bpf"} <= _allowed(admin)
    # No conditional clone or clone3 rule: both plainly allowed.
    assert [r for r in admin["syscalls"] if r.get("args") or r.get("errnoRet")] == [
        r for r in admin["syscalls"] if r["names"] in (["socket"], ["personality"])]
    none = seccomp_profile.default_profile((), "x86_64")
    assert "chroot" not in _allowed(none)
    more = seccomp_profile.default_profile(("CAP_SYS_PTRACE", "CAP_SYS_TIME", "CAP_SYSLOG"),
                                           "x86_64")
    assert {"kcmp", "clock_settime", "syslog"} <= _allowed(more)
    arm = seccomp_profile.default_profile(CAPABILITIES, "aarch64")
    assert arm["architectures"][0] == "SCMP_ARCH_AARCH64" and "arch_prctl" not in _allowed(arm)
    with pytest.raises(ConfigError, match="no default profile for the s390x architecture"):
        seccomp_profile.default_profile(CAPABILITIES, "s390x")


PROBE = r'''
import ctypes, errno, json, os, socket, sys
from hyperstart_agent.container import seccomp
seccomp.install(seccomp.compile_filter(seccomp.parse(json.loads(sys.argv[1]))))
libc = ctypes.CDLL(None, use_errno=True)
libc.personality.argtypes = (ctypes.c_ulong,)
def call(name, *args):
    rc = getattr(libc, name)(*args)
    return "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
def sock(family):
    try:
        socket.socket(family, socket.SOCK_STREAM if family != socket.AF_ALG
                      else socket.SOCK_SEQPACKET).close()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({
    "AF_UNIX": sock(socket.AF_UNIX), "AF_INET": sock(socket.AF_INET),
    "AF_VSOCK": sock(socket.AF_VSOCK), "AF_ALG": sock(socket.AF_ALG),
    "unshare": call("unshare", 0x00020000), "mount": call("mount", None, b"/", None, 0, None),
    "keyctl": call("syscall", 250, 0, 0, 0, 0, 0),
    "clone3": call("syscall", 435, None, 0),
    "personality-query": call("personality", 0xFFFFFFFF),
    "personality-bsd": call("personality", 0x0006),
    "mkdir": call("mkdir", sys.argv[2].encode(), 0o700),
}))
'''

EXPECTED = {"AF_UNIX": "ok", "AF_INET": "ok", "AF_VSOCK": "EPERM", "AF_ALG": "EPERM",
            "unshare": "EPERM", "mount": "EPERM", "keyctl": "EPERM", "clone3": "ENOSYS",
            "personality-query": "ok", "personality-bsd": "EPERM", "mkdir": "ok"}


def test_the_agent_loads_the_profile_and_the_kernel_enforces_it(tmp_path: Path) -> None:
    """In a real kernel (the host's, as root: everything refused is refused by the filter),
    compiled by the agent's own seccomp module with libseccomp."""
    profile = seccomp_profile.default_profile(CAPABILITIES)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(profile),
                          str(tmp_path / "made")], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert json.loads(out) == EXPECTED


@pytest.mark.vm
def test_a_container_under_the_default_profile_in_a_real_guest(
        runtime_config: config.RuntimeConfig, python_rootfs: Path) -> None:  # noqa: F811
    """The same calls in a container of a real guest: the agent's compiler, the guest's
    libseccomp and kernel."""
    profile = seccomp_profile.default_profile(CAPABILITIES)
    probe = PROBE.replace("from hyperstart_agent.container import seccomp\n"
                          "seccomp.install(seccomp.compile_filter(seccomp.parse("
                          "json.loads(sys.argv[1]))))\n", "")
    assert probe != PROBE  # the guest's python has no agent package: the agent compiles

    async def main() -> None:
        async with await GuestVm.boot(runtime_config, shares=(
                Share(SHARE_TAG, python_rootfs, readonly=True),)) as sandbox:
            assert sandbox.agent is not None
            status, output = await run_script(
                sandbox.agent, "probe", "probe.py", probe, "{}", "/tmp/made",
                linux={"seccomp": profile})
            assert status == 0, output
            seen = json.loads(output["stdout"])
            # /tmp is the read-only root's; EROFS comes after the filter let mkdir through.
            assert seen == {**EXPECTED, "mkdir": "EROFS"}, seen

            # An exec'd process gets the container's filter too (the agent compiled it once,
            # at the creation; the exec installs that program).
            await sandbox.agent.copy_file("/run/hyperstart/files/wait.py",
                                          b"import time; time.sleep(600)")
            await sandbox.agent.create_container(
                "execd", python_spec("execd", "wait.py", linux={"seccomp": profile}),
                storages=storages("execd"))
            await sandbox.agent.start_container("execd")
            await sandbox.agent.exec_process("execd", "p1", json.dumps({
                "args": ["python3", "-I", "/work/probe.py", "{}", "/tmp/made"],
                "env": ["PATH=/bin:/usr/bin"], "cwd": "/"}).encode())
            exec_output = await collect(sandbox.agent.stdio("execd", "p1"))
            assert await sandbox.agent.wait_process("execd", "p1", timeout_s=120) == 0
            assert json.loads(exec_output["stdout"]) == seen
            await sandbox.agent.remove_container("execd", force=True)

    asyncio.run(main())


def test_security_opt_values() -> None:
    assert opt.parse_security_opts([]) == "default"
    assert opt.parse_security_opts(["seccomp=unconfined"]) == "unconfined"
    assert opt.parse_security_opts(["seccomp:unconfined", "seccomp=default"]) == "default"
    for bad, message in ((["apparmor=x"], "only seccomp=PATH"),
                         (["seccomp"], "only seccomp=PATH"),
                         (["seccomp="], "seccomp=: give a profile file"),
                         (["seccomp=/no/such.json"], "seccomp=/no/such.json: no such profile")):
        with pytest.raises(ConfigError, match=message):
            opt.parse_security_opts(bad)


def test_profile_files_are_bounded_and_read_in_either_format(tmp_path: Path) -> None:
    oci = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}
    path = tmp_path / "oci.json"
    path.write_text(json.dumps(oci))
    assert seccomp_profile.load(path, CAPABILITIES) == oci
    # docker's format: archMap and conditions, resolved for the container.
    docker = {"defaultAction": "SCMP_ACT_ERRNO", "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []}],
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["chroot"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_CHROOT"]}},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
             "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["modify_ldt"], "action": "SCMP_ACT_ALLOW",
             "includes": {"arches": ["amd64"], "minKernel": "4.8"}},
            {"names": ["set_tls"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm"]}},
            {"names": ["future"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "9.0"}},
        ]}
    path.write_text(json.dumps(docker))
    resolved = seccomp_profile.load(path, CAPABILITIES, "x86_64")
    assert resolved["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    assert [r["names"][0] for r in resolved["syscalls"]] == [
        "read", "chroot", "clone3", "modify_ldt"]
    assert "archMap" not in resolved and "includes" not in json.dumps(resolved)
    # Bad files: one line naming the flag and the file; nothing hangs on a FIFO.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(" " * (seccomp_profile.MAX_PROFILE_BYTES + 1))
    for content, message in (("{", "not valid JSON"), ("[]", "not a seccomp profile"),
                             ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}',
                              "syscalls must be a list")):
        path.write_text(content)
        expected = re.escape(f"--security-opt seccomp={path}: {message}")
        with pytest.raises(ConfigError, match=expected):
            seccomp_profile.load(path, CAPABILITIES)
    with pytest.raises(ConfigError, match="not a regular file"):
        seccomp_profile.load(fifo, CAPABILITIES)
    with pytest.raises(ConfigError, match="larger than"):
        seccomp_profile.load(big, CAPABILITIES)


def _seccomp_mode(result: bytes) -> str:
    return next(line.split()[1] for line in result.decode().splitlines()
                if line.startswith("Seccomp:"))


@pytest.mark.vm
def test_hyperctl_applies_the_default_and_security_opt_changes_it(
        hyperctl: Hyperctl, tmp_path: Path) -> None:  # noqa: F811
    status = ["cat", "/proc/self/status"]
    assert _seccomp_mode(hyperctl("run", "--rm", "busybox", *status).stdout) == "2"
    result = hyperctl("run", "--rm", "--security-opt", "seccomp=unconfined", "busybox", *status)
    assert _seccomp_mode(result.stdout) == "0"
    profile = tmp_path / "no-mkdir.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}))
    result = hyperctl("run", "--rm", "--security-opt", f"seccomp={profile}", "busybox",
                      "mkdir", "/made", check=False)
    assert result.returncode != 0 and b"Operation not permitted" in result.stderr, result
    result = hyperctl("run", "--rm", "--security-opt", "seccomp=/no/such", "busybox", "true",
                      check=False)
    assert result.returncode == 125 and b"seccomp=/no/such: no such profile" in result.stderr


@pytest.mark.vm
def test_the_api_applies_the_default_and_its_argument_changes_it(
        hyperctl: Hyperctl, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    with ApiSandbox.create("busybox", timeout=300) as box:
        assert _seccomp_mode(box.run(["cat", "/proc/self/status"]).stdout) == "2"
    with ApiSandbox.create("busybox", timeout=300, seccomp="unconfined") as box:
        assert _seccomp_mode(box.run(["cat", "/proc/self/status"]).stdout) == "0"
    with pytest.raises(ConfigError, match="seccomp=/no/such: no such profile"):
        ApiSandbox.create("busybox", seccomp="/no/such")
