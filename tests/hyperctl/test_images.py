"""hyperctl's image commands against a real registry on 127.0.0.1 (docker-registry, pushed to
with skopeo): pull with plain progress lines, images, rmi; no VM needed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.hyperctl.conftest import Hyperctl
from tests.image.builder import Layout, file, tar_layer
from tests.image.conftest import PASSWORD, USER, Registry, registry  # noqa: F401 (a fixture)


def test_pull_images_rmi(hyperctl: Hyperctl, tmp_path: Path,
                         registry: Callable[..., Registry]) -> None:  # noqa: F811
    reg = registry(basic=True, tls=True)
    layout = Layout(tmp_path / "layout")
    layout.add(layout.image([tar_layer(file("etc/motd", b"pulled\n"))]), "v1")
    reg.push(tmp_path / "layout", "v1", "team/tool:1.0")
    ref = f"{reg.host}/team/tool:1.0"
    assert reg.certs is not None
    refused = hyperctl("pull", "--ca-file", str(reg.certs.ca), ref, check=False)
    assert refused.returncode == 1   # no credentials
    assert refused.stderr.decode().startswith("hyperctl: error: "), refused.stderr
    result = hyperctl("pull", "--ca-file", str(reg.certs.ca), "--creds", f"{USER}:wrong:pw",
                      ref, check=False)
    assert result.returncode == 1 and len(result.stderr.decode().splitlines()) == 1
    result = hyperctl("pull", "--ca-file", str(reg.certs.ca), "--creds", f"{USER}:{PASSWORD}",
                      ref)
    assert result.stdout.decode().startswith(f"{ref} sha256:")
    progress = result.stderr.decode()
    assert "pulled" in progress and "\x1b[" not in progress, progress
    rows = json.loads(hyperctl("images", "--format", "json").stdout)
    assert [r["name"] for r in rows] == [ref]
    assert ref in hyperctl("images").stdout.decode()
    assert hyperctl("images", "-q").stdout.decode().split() == [ref]
    assert hyperctl("rmi", ref).stdout.decode() == f"Untagged: {ref}\n"
    assert hyperctl("images", "-q").stdout == b""
    assert not any((hyperctl.data / "images" / "blobs" / "sha256").iterdir())


def test_info_reports_versions_and_store_size(hyperctl: Hyperctl) -> None:
    report = json.loads(hyperctl("info", "--format", "json").stdout)
    assert report["hypervisor"].startswith("QEMU emulator version")
    assert report["accelerator"] in ("kvm", "tcg") and report["accelerator_reason"]
    assert report["guest_kernel"][0].isdigit()
    assert report["guest_image"].startswith("agent ")
    assert report["store_bytes"] == {"containers": 0, "images": 0}
    hyperctl("images")   # creates nothing: the built-in image is made on first use
    text = hyperctl("info").stdout.decode()
    assert "guest_kernel:" in text and "store_bytes:" in text


def test_help_lists_every_command(hyperctl: Hyperctl) -> None:
    text = hyperctl("--help").stdout.decode()
    for command in ("run", "ps", "exec", "logs", "stop", "kill", "rm", "wait", "inspect",
                    "info", "pull", "images", "rmi", "load", "version"):
        assert f"    {command} " in text or f"    {command}\n" in text, command
