"""Logic behind drop-in compatibility with runc that runs without a VM: the guest's mount
options, seccomp rules that compare one argument several times, ambient capabilities,
device modes with type bits, `exec --cap`, the stand-in's namespaces, the guest spec's mount
namespace, and the verdicts read from the runtime-tools programs' TAP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hyperstart_agent.container import seccomp
from hyperstart_agent.container import spec as agent_spec
from hyperstart_agent.container import syscalls as sc

from runv_py.errors import SpecError
from runv_py.oci import spec as oci_spec
from runv_py.sandbox import guest_spec, standin_namespaces
from tests.conformance.runtime_tools import verdict


def test_mount_options_sorted_by_what_applies_them() -> None:
    got = sc.parse_mount_options(("rbind", "ro", "nosuid", "rprivate", "rnoexec"))
    assert got.is_bind and got.flags == sc.MS_BIND | sc.MS_REC | sc.MS_RDONLY | sc.MS_NOSUID
    assert got.propagation == sc.MS_PRIVATE | sc.MS_REC
    assert (got.recursive_set, got.recursive_clear) == (sc.MOUNT_ATTR_NOEXEC, 0)
    rro = sc.parse_mount_options(("rro", "rnoatime"), bind=True)
    assert rro.recursive_set == sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOATIME
    assert rro.recursive_clear == sc.MOUNT_ATTR__ATIME  # the kernel wants the whole mask
    assert sc.parse_mount_options(("rro", "rrw"), bind=True).recursive_set == 0
    # Filesystem data means nothing to a bind (runtime-tools' mounts program passes some).
    assert sc.parse_mount_options(("bind", "mode=755", "size=1k")).data == ""
    tmpfs = sc.parse_mount_options(("nosuid", "tmpcopyup", "size=1m", "mode=755"))
    assert tmpfs.tmpcopyup and tmpfs.data == "size=1m,mode=755" and not tmpfs.is_bind


@pytest.mark.parametrize(("options", "bind", "message"), [
    (("rbind", "bogus"), False, "'bogus' is not known for a bind mount"),
    (("nosuid", "size=1m", "rro2"), True, "'rro2' is not known for a bind mount"),
    (("idmap",), True, "'idmap': id-mapped mounts are not supported"),
])
def test_options_that_cannot_be_honoured_are_refused(options: tuple[str, ...], bind: bool,
                                                      message: str) -> None:
    with pytest.raises(sc.MountOptionError, match=message):
        sc.parse_mount_options(options, bind=bind)


def test_seccomp_comparisons_of_one_argument_become_rules_of_their_own() -> None:
    eq = seccomp.OPERATORS["SCMP_CMP_EQ"]
    one_each = (seccomp.Arg(0, 1, 0, eq), seccomp.Arg(1, 2, 0, eq))
    assert seccomp.comparisons(one_each) == [one_each]
    personality = tuple(seccomp.Arg(0, v, 0, eq) for v in (0, 8, 0xFFFFFFFF))
    assert seccomp.comparisons(personality) == [(a,) for a in personality]
    assert seccomp.comparisons(()) == [()]


def test_ambient_capabilities_raised_only_where_permitted_and_inheritable() -> None:
    kill, net = (agent_spec.CAPABILITIES.index(c) for c in ("CAP_KILL", "CAP_NET_RAW"))
    runc_spec = agent_spec.Capabilities(ambient=frozenset({kill}), permitted=frozenset({kill}))
    assert agent_spec.raisable_ambient(runc_spec) == frozenset()
    both = agent_spec.Capabilities(ambient=frozenset({kill, net}), permitted=frozenset({kill}),
                                   inheritable=frozenset({kill, net}))
    assert agent_spec.raisable_ambient(both) == frozenset({kill})


def _spec_with_device(mode: int, kind: str = "c") -> dict[str, Any]:
    return {"process": {"args": ["sh"]}, "root": {"path": "/r"},
            "linux": {"namespaces": [{"type": "mount"}], "devices": [
                {"path": "/dev/x", "type": kind, "major": 1, "minor": 3, "fileMode": mode}]}}


def test_device_file_mode_with_type_bits() -> None:
    assert agent_spec.parse(_spec_with_device(0o20666)).devices[0].file_mode == 0o666
    assert agent_spec.parse(_spec_with_device(0o640)).devices[0].file_mode == 0o640
    with pytest.raises(agent_spec.SpecError, match=r"fileMode: 0o60666 is not a mode"):
        agent_spec.parse(_spec_with_device(0o60666, "c"))


def test_exec_cap_adds_to_the_sets_runc_adds_to() -> None:
    base = {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}
    got = oci_spec.added_capabilities(base, ["CAP_NET_RAW", "sys_admin"])
    assert got["bounding"] == got["effective"] == got["permitted"] == [
        "CAP_KILL", "CAP_NET_RAW", "CAP_SYS_ADMIN"]
    assert "ambient" not in got  # nothing inheritable to raise it from
    with_inh = oci_spec.added_capabilities({**base, "inheritable": []}, ["NET_RAW"])
    assert with_inh["ambient"] == ["CAP_NET_RAW"]
    assert oci_spec.added_capabilities(None, ["CAP_KILL"])["bounding"] == ["CAP_KILL"]
    with pytest.raises(SpecError, match=r"^--cap CAP_BOGUS: unknown capability$"):
        oci_spec.added_capabilities(base, ["CAP_BOGUS"])


def test_standin_namespaces_for_a_spec() -> None:
    raw = {"linux": {"namespaces": [
        {"type": "pid"}, {"type": "network", "path": "/run/netns/x"}, {"type": "ipc"},
        {"type": "uts", "path": "/proc/1/ns/uts"}, {"type": "mount"}, {"type": "time"},
        {"type": "user"}, {"type": "cgroup"}]}}
    assert json.loads(standin_namespaces.for_spec(raw)) == {
        "new": ["pid", "ipc", "mount", "time", "user", "cgroup"], "network": "/run/netns/x"}
    assert json.loads(standin_namespaces.for_spec({})) == {"new": [], "network": ""}
    assert json.loads(standin_namespaces.for_exec(42)) == {"join": 42}


def test_guest_spec_mount_namespace_and_host_parts(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    raw = {"ociVersion": "1.1.0", "root": {"path": "rootfs"}, "process": {"args": ["sh"]},
           "linux": {"cgroupsPath": "/x", "resources": {"cpu": {"cpus": "0-7", "mems": "0",
                                                               "shares": 2}}}}
    guest = guest_spec.rewrite(oci_spec.parse(tmp_path, raw), {})
    # cgroupsPath and the cpuset are the host's (host_cgroup.py); the rest goes in.
    assert guest["linux"] == {"namespaces": [{"type": "mount"}],
                              "resources": {"cpu": {"shares": 2}}}


TAP_PASS = """TAP version 13
ok 1 - create MUST generate an error if the ID is not provided
  ---
  {
    "error": "exit status 1"
  }
  ...
ok 2 - state
1..2
"""
TAP_LIFECYCLE_FAIL = """TAP version 13
  ---
  {
    "error": "Hooks MUST be called in the listed order"
  }
  ...
1..0
"""


def test_runtime_tools_verdicts() -> None:
    assert verdict("create", TAP_PASS, 0).passed
    failed = verdict("hooks", TAP_LIFECYCLE_FAIL, 0)
    assert not failed.passed and failed.why == "Hooks MUST be called in the listed order"
    not_ok = verdict("x", TAP_PASS.replace("ok 2", "not ok 2"), 0)
    assert (not_ok.passed, not_ok.ok, not_ok.not_ok) == (False, 1, 1)
    assert not verdict("x", TAP_PASS, 1).passed
    assert verdict("prestart_fail", "", 0).passed  # *_fail programs say nothing on success
