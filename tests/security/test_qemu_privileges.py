"""QEMU (every device-emulation bug is a bug in it) runs as a uid of its own, never root, with
no_new_privs and its seccomp filter; with no file to serve it has no capability at all, and as
a 9p file server only the four file capabilities (no CAP_MKNOD, CAP_SYS_ADMIN, ...).
virtiofsd keeps root (it acts as the guest's users on the share) without CAP_MKNOD,
CAP_SETFCAP and CAP_FSETID."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import child, config
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm
from tests.hyperctl.conftest import Hyperctl
from tests.vm.conftest import processes_mentioning, runtime_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.vm

CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID = 0, 1, 2, 3, 4
CAP_MKNOD, CAP_SETFCAP = 27, 31
FILE_SERVER = (1 << CAP_CHOWN) | (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH) | (
    1 << CAP_FOWNER)


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _assert_confined(pid: int, caps: int) -> None:
    status = _status(pid)
    assert "qemu-system" in Path(f"/proc/{pid}/exe").resolve().name, status["Name"]
    uids = [int(u) for u in status["Uid"].split()]
    gids = [int(g) for g in status["Gid"].split()]
    assert 0 not in uids and 0 not in gids, status["Uid"]
    assert status["Groups"] == "", status["Groups"]
    for kind in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[kind], 16) == caps, (kind, status[kind])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"   # QEMU's -sandbox filter
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    sandbox = argv[argv.index(b"-sandbox") + 1].decode()
    assert sandbox == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def test_a_running_sandboxs_qemu_is_not_root_and_serves_9p_with_file_caps_only(
        hyperctl: Hyperctl) -> None:
    """The default path (a template clone whose shares are 9p, served by QEMU itself)."""
    cid = hyperctl("run", "-d", "busybox", "sleep", "600").stdout.decode().strip()
    qemus = [int(p.split(":")[0]) for p in processes_mentioning(str(hyperctl.state))
             if "qemu-system" in p]
    assert len(qemus) == 1, qemus
    _assert_confined(qemus[0], FILE_SERVER)
    assert hyperctl("exec", cid, "sh", "-c", "echo ok > /tmp/f; cat /tmp/f").stdout == b"ok\n"
    hyperctl("rm", "-f", cid)


def test_a_cold_booted_qemu_without_9p_has_no_capabilities(
        runtime_config: config.RuntimeConfig, tmp_path: Path) -> None:  # noqa: F811
    cfg = replace(runtime_config, template="off")
    share_dir = tmp_path / "share"
    share_dir.mkdir()

    async def main() -> None:
        share = Share("vol", share_dir, driver="virtiofs")
        async with await GuestVm.boot(cfg, shares=(share,)) as sandbox:
            assert sandbox.machine is not None and sandbox.machine.pid is not None
            _assert_confined(sandbox.machine.pid, 0)
            assert sandbox.virtiofsds and sandbox.virtiofsds[0].child is not None
            for pid in child.with_descendants(sandbox.virtiofsds[0].child.pid):
                eff = int(_status(pid)["CapEff"], 16)
                for cap in (CAP_MKNOD, CAP_SETFCAP, CAP_FSETID):
                    assert not eff & (1 << cap), (pid, cap, hex(eff))
            assert sandbox.agent is not None and await sandbox.agent.check()

    asyncio.run(main())
    assert os.listdir(share_dir) == []
