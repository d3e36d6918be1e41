"""org.runv.* annotations that change how a sandbox runs come from whoever writes the OCI spec
(a Kubernetes pod's author, when the operator lets annotations through): they are accepted
only when config.toml's `enable_annotations` names them, and the rootfs overlay (which names
host directories) never from a bundle hyperctl did not write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runv_py import config
from runv_py.errors import ConfigError
from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401  (fixtures)

OVERLAY = "org.runv.rootfs-overlay"


def test_overlay_from_a_foreign_bundle_mounts_no_host_directory(
        runv: Runv, tmp_path: Path) -> None:  # noqa: F811
    """A pod spec naming a host directory as the overlay's lower layer: refused before any
    VM starts; the container never sees the host file."""
    host = tmp_path / "host-secrets"
    host.mkdir()
    (host / "secret").write_text("host secret\n")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    layers = {"lower": [str(host), str(runv.rootfs)], "upper": str(upper), "work": str(work)}

    def edit(spec: dict[str, Any]) -> None:
        spec["annotations"] = {OVERLAY: json.dumps(layers)}

    bundle = runv.bundle(["cat", "/secret"], edit)
    result = runv("run", "--bundle", str(bundle), "overlay", check=False)
    assert b"host secret" not in result.stdout, result.stdout
    assert result.returncode == 1, result.stderr
    assert f"annotations['{OVERLAY}']".encode() in result.stderr
    assert b"hyperctl" in result.stderr


def test_annotations_not_enabled_in_the_config_are_refused(runv: Runv) -> None:  # noqa: F811
    runv.config.write_text(runv.config.read_text().replace(
        "[hypervisor]", "enable_annotations = []\n[hypervisor]"))

    def edit(spec: dict[str, Any]) -> None:
        spec["annotations"] = {"org.runv.template": "off"}

    bundle = runv.bundle(["true"], edit)
    result = runv("run", "--bundle", str(bundle), "notenabled", check=False)
    assert result.returncode == 1, result.stderr
    err = result.stderr.decode()
    assert "annotations['org.runv.template']" in err and "enable_annotations" in err, err


@pytest.mark.parametrize(("value", "message"), [
    ('["rootfs-overlay"]', "rootfs-overlay cannot be enabled"),
    ('["kernel_params"]', "unknown annotation 'kernel_params'"),
    ('"template"', "must be a list"),
])
def test_enable_annotations_config_values(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse(f"enable_annotations = {value}\n", "test.toml")


def test_enable_annotations_default_and_parsed() -> None:
    assert config.RuntimeConfig().enable_annotations == ("template", "shared-fs")
    assert config.parse('enable_annotations = ["shared-fs"]\n', "t").enable_annotations == (
        "shared-fs",)
