"""A container's network namespace (given by path in config.json, as CNI, containerd and
podman give it) extended into the VM with a tap and tc mirroring."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import Runv

from .conftest import Lab, run_output, with_netns


def test_container_fetches_a_page_from_a_peer_namespace(runv: Runv, lab: Lab,
                                                        tmp_path: Path) -> None:
    net = lab.subnet
    container, peer = lab.netns("c"), lab.netns("p")
    lab.veth(container, "eth0", peer, "peer0", addr_a=(f"10.{net}.1.2/24",),
             addr_b=(f"10.{net}.1.1/24",))
    before = lab.link_state(container, "eth0")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the peer\n")
    lab.spawn(peer, "busybox", "httpd", "-f", "-p", f"10.{net}.1.1:8080", "-h", str(www))
    lab.wait_listening(peer, 8080)

    script = (f"wget -q -O - http://10.{net}.1.1:8080/index.html; "
              "ip -o addr show eth0; ip -o link show eth0")
    result = run_output(runv, "n1", script, with_netns(lab.path(container)))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "hello from the peer" in out
    assert f"10.{net}.1.2/24" in out
    assert before[0].split()[0] in out  # the guest's NIC has the veth's MAC

    # The caller's veth is as it was; the taps and qdiscs are gone.
    assert lab.mirror_state(container) == []
    assert lab.link_state(container, "eth0") == before
