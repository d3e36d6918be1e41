"""The supervisor's rootfs overlay (the annotation hyperctl's bundles carry), refused with a
clear error when it is malformed, before any VM boots, leaving nothing behind. The bundles are
written as hyperctl writes them (the overlay marker beside config.json); without the marker
the overlay is refused outright (tests/security/test_runtime_annotations.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runv_py.runtime_annotations import ROOTFS_OVERLAY, write_marker
from runv_py.sandbox.policy import ROOTFS_OVERLAY_ANNOTATION
from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401 (fixtures)


@pytest.mark.parametrize(("value", "message"), [
    ("not json", 'must be {"lower": [dirs], "upper": dir, "work": dir}'),
    (json.dumps({"lower": ["rel"], "upper": "/tmp", "work": "/tmp"}),
     "needs absolute lower, upper and work directories"),
    (json.dumps({"lower": ["/nonexistent-hc-lower"], "upper": "/tmp", "work": "/tmp"}),
     "/nonexistent-hc-lower is not a directory"),
])
def test_bad_overlay_annotation(runv: Runv, tmp_path: Path, value: str,  # noqa: F811
                                message: str) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["annotations"] = {ROOTFS_OVERLAY_ANNOTATION: value}

    bundle = runv.bundle(["true"], edit)
    write_marker(bundle, ROOTFS_OVERLAY, value)
    result = runv("run", "--bundle", str(bundle), "ov", check=False)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"annotations['{ROOTFS_OVERLAY_ANNOTATION}']" in err and message in err, err
