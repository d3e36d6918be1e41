"""Boundary: the devices of the guest. A container's root may make device nodes (CAP_MKNOD is
in docker's default set) but may open only the devices its rules allow: the memory devices,
its terminals, and what linux.devices and linux.resources.devices add. Without this, container
root wrote to the guest's serial console (`mknod /dev/s c 4 64`), which floods the host's
console log, and could read the guest's disks.

- the rules' meaning (cgroup v1's, as runc reads them), a pure function;
- the compiled BPF program, loaded into the host kernel and asked by real mknod and open
  calls, against that meaning;
- hyperctl's default container in a real guest; a spec's own rules, their update, and exec'd
  processes, through the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hyperstart_agent.container import device_cgroup as dc
from hyperstart_agent.container import spec as agent_spec
from hyperstart_agent.container.device_cgroup import Policy
from hyperstart_agent.container.spec import DeviceRule as R

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.devices import Share
from runv_py.errors import AgentError
from runv_py.sandbox.guest_vm import GuestVm
from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401
from tests.security.guest import MOUNT, SHARE_TAG, collect, storages
from tests.vm.conftest import runtime_config  # noqa: F401

DENY_ALL = R(False)


def _defaults(*rules: R) -> Policy:
    return Policy.of(dc.container_rules(rules, ()))


def test_rules_mean_what_they_meant_to_cgroup_v1() -> None:
    p = _defaults(DENY_ALL)
    assert not p.default_allow
    assert p.allows("c", 1, 3, "rw") and p.allows("c", 136, 7, "rw")  # null, a pty
    assert p.allows("c", 4, 64, "m") and not p.allows("c", 4, 64, "w")  # ttyS0: made, not used
    assert not p.allows("b", 254, 0, "r")  # the guest's disk
    # The defaults apply after the spec's rules, so no spec can take them away; a spec
    # without rules gets only them (runc's behaviour).
    assert Policy.of(dc.container_rules(None, ())) == p
    # A request must be covered by one rule: r from one and w from another is not rw.
    q = _defaults(DENY_ALL, R(True, "c", None, None, "r"), R(True, "c", 4, 64, "w"))
    assert q.allows("c", 4, 64, "r") and q.allows("c", 4, 64, "w")
    assert not q.allows("c", 4, 64, "rw")
    # "a" resets: allow everything, then deny a class; a deny matches on any overlap.
    d = _defaults(R(True), R(False, "c", 4, None, "w"))
    assert d.default_allow and d.allows("b", 8, 0, "rw") and d.allows("c", 4, 1, "r")
    assert not d.allows("c", 4, 1, "rw")
    # Later rules win over earlier ones of the same device.
    assert not _defaults(DENY_ALL, R(True, "c", 10, 1), R(False, "c", 10, 1, "w")
                         ).allows("c", 10, 1, "w")
    # linux.devices entries are usable, fifos are not devices.
    nodes = (agent_spec.Device("/dev/vdb", "b", 254, 16), agent_spec.Device("/dev/f", "p"))
    assert Policy.of(dc.container_rules((DENY_ALL,), nodes)).allows("b", 254, 16, "rwm")
    # Taking access back from inside a wildcard rule cannot be honoured: refused, not ignored.
    with pytest.raises(dc.DeviceRuleError, match=r"c \*:\* rwm covers it"):
        Policy.of((DENY_ALL, R(True, "c"), R(False, "c", 4, 64)))


def test_spec_device_rules_are_checked_field_by_field() -> None:
    def parse(rules: object) -> object:
        return agent_spec.parse_resources({"devices": rules})

    assert parse([{"allow": False, "access": "rwm"}]).devices == (DENY_ALL,)  # type: ignore
    assert parse([{"allow": True, "type": "c", "major": 1, "minor": -1, "access": "wr"}]
                 ).devices == (R(True, "c", 1, None, "rw"),)  # type: ignore[attr-defined]
    for rules, field in (([{"access": "r"}], "devices[0].allow"),
                         ([{"allow": True, "type": "p"}], "devices[0].type"),
                         ([{"allow": True, "access": "rx"}], "devices[0].access"),
                         ([{"allow": True, "access": ""}], "devices[0].access"),
                         ([{"allow": True, "major": "1"}], "devices[0].major"),
                         ({"allow": True}, "devices")):
        with pytest.raises(agent_spec.SpecError, match=re.escape(f"linux.resources.{field}:")):
            parse(rules)


# --- the compiled program in a real kernel (the host's) ------------------------------------

def _unused_majors(kind: str, count: int) -> list[int]:
    """Majors no driver has here (from the ranges reserved for local use): opening a node of
    one fails with ENXIO once the device cgroup lets it through, with EPERM before."""
    section = "Character devices:" if kind == "c" else "Block devices:"
    used: set[int] = set()
    current = None
    for line in Path("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            current = line
        elif line.strip() and current == section:
            used.add(int(line.split()[0]))
    free = [m for m in (*range(60, 64), *range(120, 128), *range(240, 255)) if m not in used]
    assert len(free) >= count, f"no unused {kind} majors in {used}"
    return free[:count]


@contextlib.contextmanager
def _cgroup2() -> Iterator[Path]:
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    roots = [Path(f[4]) for f in mounts if f[f.index("-") + 1] == "cgroup2"]
    assert roots, "no cgroup2 hierarchy mounted on this host"
    path = Path(tempfile.mkdtemp(prefix="runv-devcg-", dir=roots[0]))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


PROBE = r'''
import errno, json, os, sys
cgroup, nodes, requests = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}
answers = []
for i, (kind, major, minor, access) in enumerate(requests):
    node = os.path.join(nodes, f"{kind}-{major}-{minor}")
    try:
        if access == "m":
            os.mknod(os.path.join(nodes, f"new-{i}"),
                     0o600 | (0o020000 if kind == "c" else 0o060000), os.makedev(major, minor))
        else:
            os.close(os.open(node, flags[access] | os.O_NONBLOCK | os.O_NOCTTY))
        answers.append(True)
    except OSError as exc:
        answers.append(exc.errno != errno.EPERM)
print(json.dumps(answers))
'''


def test_the_compiled_program_answers_as_the_rules_in_a_real_kernel(tmp_path: Path) -> None:
    c1, c2 = _unused_majors("c", 2)
    (b1,) = _unused_majors("b", 1)
    requests = [(kind, major, minor, access)
                for kind, major in (("c", c1), ("c", c2), ("b", b1))
                for minor in (0, 1, 7)
                for access in ("m", "r", "w", "rw")]
    for kind, major, minor, _ in requests:
        node = tmp_path / f"{kind}-{major}-{minor}"
        if not node.exists():
            os.mknod(node, 0o600 | (0o020000 if kind == "c" else 0o060000),
                     os.makedev(major, minor))
    rule_sets = [
        (DENY_ALL,),
        (DENY_ALL, R(True, "c", c1, None, "r"), R(True, "c", c1, 7, "w"),
         R(True, "b", b1, 1, "rw")),
        (DENY_ALL, R(True, "c", None, 1, "rw"), R(True, "c", c2, None, "m")),
        (R(True), R(False, "c", c1, None, "w"), R(False, "b", None, None, "m")),
        (R(True), R(False, "c", c2, 7), R(False, "c", None, 0, "r")),
    ]
    rng = random.Random(18)
    for _ in range(6):  # and some made up, each checked against the same meaning
        rules = [R(rng.choice((True, False)))]
        for _ in range(rng.randrange(1, 6)):
            kind, major = rng.choice((("c", c1), ("c", c2), ("b", b1)))
            rules.append(R(rules[0].allow is False, kind, rng.choice((major, None)),
                           rng.choice((0, 1, 7, None)),
                           "".join(a for a in "rwm" if rng.random() < 0.6) or "r"))
        rule_sets.append(tuple(rules))
    for rules in rule_sets:
        policy = Policy.of(rules)
        program = dc.load(dc.compile_program(policy))
        try:
            with _cgroup2() as cgroup:
                directory = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    dc.attach(directory, program)
                finally:
                    os.close(directory)
                out = subprocess.run([sys.executable, "-c", PROBE, str(cgroup), str(tmp_path),
                                      json.dumps(requests)], capture_output=True, text=True,
                                     timeout=60, check=True).stdout
        finally:
            os.close(program)
        for node in tmp_path.glob("new-*"):
            node.unlink()
        answers = dict(zip(requests, json.loads(out), strict=True))
        expected = {r: policy.allows(*r) for r in requests}
        wrong = {r: got for r, got in answers.items() if got != expected[r]}
        assert not wrong, f"rules {rules}: the kernel answered otherwise for {wrong}"


def _program_id(fd: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text()
                  .splitlines() if ":" in line)
    return int(fields["prog_id"])


def _program_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:bpf-prog":
                found.add(int(name))
    return found


def test_the_same_rules_load_one_program_and_the_cache_is_bounded() -> None:
    (major,) = _unused_majors("c", 1)
    programs = [dc.compile_program(Policy.of((DENY_ALL, R(True, "c", major, minor, "r"))))
                for minor in range(dc._SHARED_MAX + 4)]
    fds = [dc.load_shared(programs[0]), dc.load_shared(programs[0]),
           dc.load_shared(programs[1])]
    try:
        # Each container has its own fd (closing one leaves the others), of one program.
        assert len(set(fds)) == 3
        assert _program_id(fds[0]) == _program_id(fds[1]) != _program_id(fds[2])
        before = _program_fds()
        for program in programs:
            os.close(dc.load_shared(program))
        assert len(_program_fds() - before) <= dc._SHARED_MAX
        # The oldest left the cache: loaded again, it is a new program.
        renewed = dc.load_shared(programs[0])
        fds.append(renewed)
        assert _program_id(renewed) != _program_id(fds[0])
    finally:
        for fd in fds:
            os.close(fd)


# --- in a real guest -------------------------------------------------------------------------

@pytest.mark.vm
def test_container_root_cannot_use_a_device_it_makes(hyperctl: Hyperctl) -> None:  # noqa: F811
    # The serial console is c 4:64: made, but not opened.
    result = hyperctl("run", "--rm", "busybox", "sh", "-c",
                      "mknod /dev/s c 4 64 && echo made && echo runv-device-cgroup > /dev/s",
                      check=False)
    assert result.stdout == b"made\n", result.stderr
    assert result.returncode != 0 and b"Operation not permitted" in result.stderr
    # The guest's disk: not even readable.
    result = hyperctl("run", "--rm", "busybox", "sh", "-c",
                      "set -- $(tr : ' ' < /sys/block/vda/dev) && mknod /dev/d b $1 $2 && "
                      "head -c 512 /dev/d | wc -c", check=False)
    assert b"Operation not permitted" in result.stderr, result

    # What every container needs still works, and /dev's mounts have the flags they should:
    # /dev itself is a tmpfs that must hold nodes (nosuid, not nodev); shm and mqueue hold
    # none (nodev).
    script = ("echo discarded > /dev/null && head -c 16 /dev/urandom | wc -c && "
              "head -c 8 /dev/zero | wc -c && head -c 4 /dev/random | wc -c && "
              "! echo x > /dev/full && grep ' /dev' /proc/self/mountinfo")
    result = hyperctl("run", "--rm", "busybox", "sh", "-c", script, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["16", "8", "4"]
    options = {fields[4]: set(fields[5].split(",")) | set(fields[-1].split(","))
               for fields in (line.split() for line in lines[3:])}
    assert "nosuid" in options["/dev"] and "nodev" not in options["/dev"]
    for path in ("/dev/shm", "/dev/mqueue"):
        assert {"nosuid", "nodev", "noexec"} <= options[path], (path, options[path])
    assert {"nosuid", "noexec"} <= options["/dev/pts"]
    # A terminal: its pty (136:*), /dev/tty and /dev/ptmx.
    code, output = hyperctl.in_pty("run", "--rm", "-t", "busybox", "sh", "-c",
                                   "tty && echo via-tty > /dev/tty && ls -l /dev/ptmx")
    assert code == 0 and b"/dev/pts/" in output and b"via-tty" in output, output


def _busybox_spec(container_id: str, args: list[str], rules: list[dict[str, object]]) -> bytes:
    return json.dumps({
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": MOUNT.format(container_id), "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
                  "resources": {"devices": rules}},
    }).encode()


# Opens only (no reads or writes): /dev/kmsg is c 1:11, made by the container itself.
OPENS = ("mknod /dev/kmsg c 1 11 2>/dev/null; (true < /dev/kmsg) 2>/dev/null && echo r; "
         "(true > /dev/kmsg) 2>/dev/null && echo w; true")


@pytest.mark.vm
def test_spec_rules_apply_to_every_process_and_update_replaces_them(
        runtime_config: config.RuntimeConfig, busybox_rootfs: Path) -> None:  # noqa: F811
    async def opens(agent: AgentClient, exec_id: str) -> list[str]:
        process = json.dumps({"args": ["sh", "-c", OPENS], "env": ["PATH=/bin"], "cwd": "/"})
        await agent.exec_process("c", exec_id, process.encode())
        output = asyncio.create_task(collect(agent.stdio("c", exec_id)))
        assert await agent.wait_process("c", exec_id, timeout_s=60) == 0
        return (await output)["stdout"].decode().split()

    async def main() -> None:
        async with await GuestVm.boot(runtime_config, shares=(
                Share(SHARE_TAG, busybox_rootfs, readonly=True),)) as sandbox:
            agent = sandbox.agent
            assert agent is not None
            # A rule list cgroup v1 could not honour is refused, naming the field.
            with pytest.raises(AgentError, match=r"linux\.resources\.devices: cannot deny"):
                await agent.create_container("bad", _busybox_spec("bad", ["true"], [
                    {"allow": False, "access": "rwm"}, {"allow": True, "type": "c",
                                                        "access": "rwm"},
                    {"allow": False, "type": "c", "major": 1, "minor": 11, "access": "w"}]),
                    storages=storages("bad"))
            rules = [{"allow": False, "access": "rwm"},
                     {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "r"}]
            await agent.create_container("c", _busybox_spec("c", ["sleep", "600"], rules),
                                         storages=storages("c"))
            await agent.start_container("c")
            assert await opens(agent, "e1") == ["r"]
            await agent.update_container("c", json.dumps({"devices": [
                {"allow": True, "type": "c", "major": 1, "minor": 11, "access": "rw"}]}).encode())
            assert await opens(agent, "e2") == ["r", "w"]
            await agent.update_container("c", json.dumps({"devices": []}).encode())
            assert await opens(agent, "e3") == []
            await agent.remove_container("c", force=True)

    asyncio.run(main())

