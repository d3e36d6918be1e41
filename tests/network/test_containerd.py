"""containerd hands runv a network namespace by path (`ctr run --with-ns network:PATH`, as
its CRI plugin does after CNI): the task's VM takes that namespace's interface."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import (  # noqa: F401  (fixtures)
    IMAGE,
    Containerd,
    containerd,
    image_archive,
    runtime_env,
)

from .conftest import Lab, peer_http


def test_ctr_run_with_a_network_namespace_path(containerd: Containerd,  # noqa: F811
                                               image_archive: Path,  # noqa: F811
                                               lab: Lab) -> None:
    net = lab.subnet
    container, peer = lab.pair(13)
    peer_http(lab, peer, f"10.{net}.13.1")
    containerd.ctr("image", "import", str(image_archive))
    result = containerd.ctr(
        "run", "--rm", *containerd.run_args(), "--with-ns", f"network:{lab.path(container)}",
        IMAGE, "net1", "sh", "-c",
        f"wget -q -O - http://10.{net}.13.1:8080/ | head -n 1; ip -o -4 addr show eth0",
        check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.startswith("mss=") and f"10.{net}.13.2/24" in out, out
    assert lab.mirror_state(container) == []
