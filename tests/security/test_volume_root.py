"""Guest root is not host root on a hyperctl volume (the issue's reproduction: `hyperctl run -v
$T:/v busybox sh -c 'cp /bin/busybox /v/sx; chmod 4755 /v/sx'` left a setuid-root $T/sx).
Volumes are id-mapped: guest root is the host's nobody (so a volume it should write to is
given to nobody), what it creates is nobody's, the host root's files are readable and not its
to change, other ids are themselves; no device node can be made there. Both shared
filesystems: 9p (the template path, QEMU serves it) and virtio-fs (a cold boot, virtiofsd)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.hyperctl.conftest import Hyperctl

pytestmark = pytest.mark.vm

NOBODY = 65534
SCRIPT = """
cp /bin/busybox /v/sx && chmod 4755 /v/sx
mkdir /v/d && chmod 2777 /v/d
mknod /v/null c 1 3 2>/dev/null && echo made-a-device
chmod 4755 /v/hosts 2>/dev/null && echo chmod-of-host-root-file
echo appended >> /v/hosts 2>/dev/null && echo wrote-host-root-file
touch /v/rootdir/new 2>/dev/null && echo wrote-in-host-root-dir
cat /v/hosts
echo from-user > /v/user-file && stat -c %u /v/user-file
"""


@pytest.mark.parametrize("template", ["auto", "off"])
def test_guest_root_is_not_host_root_on_a_volume(hyperctl: Hyperctl, tmp_path: Path,
                                                  template: str) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    os.chown(volume, NOBODY, NOBODY)   # the container's root may write here
    (volume / "hosts").write_text("127.0.0.1 host-root-owned\n")   # root's, 0644
    (volume / "rootdir").mkdir(mode=0o777)
    (volume / "rootdir").chmod(0o777)
    (volume / "user-file").write_text("")
    os.chown(volume / "user-file", 1000, 1000)
    result = hyperctl("run", "--rm", "--template", template, "-v", f"{volume}:/v", "busybox",
                      "sh", "-c", SCRIPT, check=False)
    out = result.stdout.decode()
    sx = (volume / "sx").stat()
    assert not (sx.st_uid == 0 and sx.st_mode & (stat.S_ISUID | stat.S_ISGID)), oct(sx.st_mode)
    assert sx.st_uid == NOBODY, sx.st_uid
    assert (volume / "d").stat().st_uid == NOBODY
    assert "made-a-device" not in out and not (volume / "null").exists()
    assert "chmod-of-host-root-file" not in out and "wrote-host-root-file" not in out, out
    assert "wrote-in-host-root-dir" not in out and not (volume / "rootdir/new").exists()
    hosts = (volume / "hosts").stat()
    assert (hosts.st_uid, stat.S_IMODE(hosts.st_mode)) == (0, 0o644)
    assert "127.0.0.1 host-root-owned" in out            # still readable
    assert out.strip().endswith("1000"), out              # other ids are themselves
    assert (volume / "user-file").read_text() == "from-user\n"
