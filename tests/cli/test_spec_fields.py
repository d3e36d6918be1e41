"""config.md fields end to end through `runv run`: what the process inside the VM sees, over
both ways of sharing files with the guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import Runv

SCRIPT = """
echo uid=$(id -u) gid=$(id -g) groups="$(id -G)"
echo cwd=$(pwd) env=$GREETING host=$(hostname) domain=$(cat /proc/sys/kernel/domainname)
echo umask=$(umask)
echo nofile=$(ulimit -n)
grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status | tr -s '\\t ' ' '
echo rw > /data/rw/written && echo rw-ok
echo ro > /data/ro/written 2>/dev/null || echo ro-refused
cat /data/ro/hello
touch /rootfile 2>/dev/null || echo root-readonly
echo tmp > /scratch/x && echo tmpfs-ok
cat /proc/kcore 2>&1 | head -c 0; [ -s /proc/kcore ] || echo kcore-masked
echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo procsys-readonly
echo ipfwd=$(cat /proc/sys/net/ipv4/ip_forward)
echo loflags=$(cat /sys/class/net/lo/flags)
"""


def _fields(tmp_path: Path, shared_fs: str) -> Any:
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    rw.mkdir()
    rw.chmod(0o777)
    ro.mkdir()
    (ro / "hello").write_text("from-host\n")

    def edit(spec: dict[str, Any]) -> None:
        spec["annotations"] = {"org.runv.shared-fs": shared_fs}
        spec["root"]["readonly"] = True
        spec["domainname"] = "example.test"
        spec["process"].update({
            "args": ["sh", "-c", SCRIPT],
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 0o27},
            "cwd": "/tmp", "env": ["PATH=/bin", "GREETING=hello"],
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}],
            "capabilities": {k: ["CAP_KILL"] for k in
                             ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        })
        spec["mounts"] += [
            {"destination": "/data/rw", "type": "bind", "source": str(rw),
             "options": ["rbind", "rw"]},
            {"destination": "/data/ro", "type": "bind", "source": str(ro),
             "options": ["rbind", "ro"]},
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
             "options": ["size=1m", "mode=1777"]},
        ]
        spec["linux"]["maskedPaths"] = ["/proc/kcore"]
        spec["linux"]["readonlyPaths"] = ["/proc/sys"]
        spec["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}

    return edit


@pytest.mark.parametrize("shared_fs", ["virtio-fs", "9p"])
def test_spec_fields_seen_inside(runv: Runv, tmp_path: Path, shared_fs: str) -> None:
    bundle = runv.bundle([], edit=_fields(tmp_path, shared_fs))
    (bundle / "rootfs" / "tmp").chmod(0o1777)
    result = runv("run", "--bundle", str(bundle), "f1", check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    lines = out.splitlines()
    assert lines[0] == "uid=1000 gid=1000 groups=1000 2000"
    assert lines[1] == "cwd=/tmp env=hello host=runvbox domain=example.test"
    assert lines[2] == "umask=0027"
    assert lines[3] == "nofile=256"
    assert "CapBnd: 0000000000000020" in out  # CAP_KILL only
    assert "CapEff: 0000000000000000" in out  # not root, no ambient set: none effective
    assert "NoNewPrivs: 1" in out
    for marker in ("rw-ok", "ro-refused", "from-host", "root-readonly", "tmpfs-ok",
                   "kcore-masked", "procsys-readonly", "ipfwd=1",
                   "loflags=0x9"):  # lo is up (IFF_UP | IFF_LOOPBACK): localhost works
        assert marker in lines, (marker, out, result.stderr)
    assert (tmp_path / "rw" / "written").read_text() == "rw\n"
    assert not (tmp_path / "ro" / "written").exists()
