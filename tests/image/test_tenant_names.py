"""Image names scoped by tenant: each tenant tags images in its own names, finds the shared
(operator's) names but cannot retag or remove them, and one layer is stored and unpacked once
for everyone."""

from __future__ import annotations

from pathlib import Path

import pytest

from runv_py.errors import ImageError, ImageNotFound
from runv_py.oci.image import ImageStore

from .builder import Layout, file, tar_layer


def _layout(path: Path, content: bytes, tag: str) -> Path:
    layout = Layout(path)
    layout.add(layout.image([tar_layer(file("base", b"b" * 50_000)),
                             tar_layer(file("app", content))], cmd=("/app",)), tag)
    return path


def test_tenants_have_their_own_names_over_shared_layers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    operator, a, b = (ImageStore(root), ImageStore(root, tenant="a"),
                      ImageStore(root, tenant="b"))
    # the same name in two tenants: each its own image; the base layer stored once
    (mine,) = a.load(_layout(tmp_path / "a" / "app", b"A", "python"))
    (theirs,) = b.load(_layout(tmp_path / "b" / "app", b"B", "python"))
    assert mine.name == theirs.name == "app:python"
    assert mine.digest != theirs.digest
    assert a.get("app:python").digest == mine.digest
    assert b.get("app:python").digest == theirs.digest
    with pytest.raises(ImageNotFound):
        operator.get("app:python")
    assert mine.layers[0] == theirs.layers[0]
    assert len([d for d in operator.blobs.digests() if d == mine.layers[0]]) == 1

    # a shared name: every tenant runs it, none may retag or remove it
    (shared,) = operator.load(_layout(tmp_path / "python", b"shared", "3.12"))
    assert a.get("python:3.12").digest == b.get("python:3.12").digest == shared.digest
    hostile = _layout(tmp_path / "evil", b"evil", "x")
    (evil,) = a.load(hostile)
    with pytest.raises(ImageError, match="shared image of this host: tenant a cannot retag"):
        a.tag("python:3.12", evil.digest)
    assert b.get("python:3.12").digest == shared.digest
    with pytest.raises(ImageError, match="tenant a cannot remove it"):
        a.remove("python:3.12")
    a.tag("python:3.12", shared.digest)      # the same manifest: nothing to change
    assert "python:3.12" in [i.name for i in a.images()]

    # the built-in busybox is shared whoever asks first
    assert a.get("busybox").name == "busybox:latest"
    assert operator.get("busybox").digest == b.get("busybox").digest

    # removing a tenant's name frees only what no tenant (and no shared name) uses
    a.rootfs(mine)
    b.rootfs(theirs)
    assert a.remove("app:python") == ["app:python"]
    a.gc()
    assert b.get("app:python").digest == theirs.digest
    assert operator.blobs.exists(theirs.layers[0]) and operator.blobs.exists(
        theirs.layers[1])
    assert not operator.blobs.exists(mine.layers[1])
    assert b.rootfs(theirs).is_dir()
