"""The local image store: built-in busybox, loads from archives, names, gc, unpack caching."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from runv_py.errors import ImageError, ImageNotFound, UnsafeLayer
from runv_py.oci.image import ImageStore
from runv_py.oci.image.builtin import build

from .builder import Layout, digest, directory, file, symlink, tar_layer
from .conftest import run


def test_builtin_busybox_on_first_use(store: ImageStore, tmp_path: Path) -> None:
    image = store.get("busybox")
    assert image.name == "busybox:latest"
    assert image.config.cmd == ("sh",)
    assert any(e.startswith("PATH=") and "/bin" in e for e in image.config.env)
    assert store.get("busybox:latest") == image == store.get("docker.io/library/busybox")
    assert store.get(image.id[7:19]) == image
    # deterministic: another store, built again, gets the same digests
    other = ImageStore(tmp_path / "other").get("busybox")
    assert (other.digest, other.id, other.layers) == (image.digest, image.id, image.layers)
    assert build().manifest == build().manifest
    rootfs = store.rootfs(image)
    assert (rootfs / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    assert "root:x:0:0:" in (rootfs / "etc/passwd").read_text()
    assert "root:x:0:" in (rootfs / "etc/group").read_text()
    assert oct((rootfs / "tmp").stat().st_mode & 0o7777) == "0o1777"
    assert (rootfs / "root").is_dir()
    out = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", "echo hello; id -un"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out == "hello\nroot\n"


def test_unknown_image_says_to_pull_or_load(store: ImageStore) -> None:
    with pytest.raises(ImageNotFound, match=r"'nothere' is not in the local store.*pull"):
        store.get("nothere")
    with pytest.raises(ImageError, match="repository name must be lowercase"):
        store.get("Bad/Name")
    with pytest.raises(ImageNotFound):
        store.remove("nothere")


def make_layout(path: Path) -> Layout:
    layout = Layout(path)
    layout.add(layout.image([
        tar_layer(directory("etc"), file("etc/os-release", b"ID=test\n"),
                  file("bin/app", b"#!/bin/sh\necho app\n", 0o755), symlink("bin/sh", "app")),
        tar_layer(file("etc/.wh.os-release"), file("etc/motd", b"hi\n")),
    ], cmd=("/bin/app",)), "1.0")
    return layout


def check_loaded(store: ImageStore, name: str) -> None:
    image = store.get(name)
    assert image.config.cmd == ("/bin/app",)
    rootfs = store.rootfs(image)
    assert sorted(os.listdir(rootfs / "etc")) == ["motd"]
    assert (rootfs / "bin/app").stat().st_mode & 0o777 == 0o755


def test_load_oci_layout_dir(tmp_path: Path, store: ImageStore) -> None:
    make_layout(tmp_path / "myapp")
    (image,) = store.load(tmp_path / "myapp")
    assert image.name == "myapp:1.0"
    check_loaded(store, "myapp:1.0")


@pytest.mark.parametrize(("transport", "name"), [
    ("oci-archive", "example.com/team/app:2.0"),   # a tar of an OCI layout
    ("docker-archive", "app:3.0"),                 # the `docker save` format
])
def test_load_archive_made_by_skopeo(tmp_path: Path, store: ImageStore, transport: str,
                                     name: str) -> None:
    make_layout(tmp_path / "layout")
    archive = tmp_path / "app.tar"
    run("skopeo", "--insecure-policy", "copy", "-q", f"oci:{tmp_path / 'layout'}:1.0",
        f"{transport}:{archive}:{name}")
    (image,) = store.load(archive)
    assert image.name == name
    check_loaded(store, name)
    with pytest.raises(ImageNotFound):
        store.get(name.partition(":")[0])   # :latest


def test_load_rejects_a_tampered_archive(tmp_path: Path, store: ImageStore) -> None:
    layout = make_layout(tmp_path / "layout")
    index = json.loads((layout.path / "index.json").read_text())
    manifest = json.loads((layout.path / "blobs/sha256" /
                           index["manifests"][0]["digest"][7:]).read_text())
    layer = layout.path / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=manifest["layers"][0]["digest"]):
        store.load(layout.path)
    assert store.images() == []
    with pytest.raises(ImageError, match="neither an oci-archive"):
        empty = tmp_path / "empty.tar"
        run("tar", "-cf", str(empty), "--files-from", "/dev/null")
        store.load(empty)


def test_remove_and_gc(tmp_path: Path, store: ImageStore) -> None:
    make_layout(tmp_path / "one")
    other = Layout(tmp_path / "two")
    other.add(other.image([tar_layer(file("other", b"x" * 100_000))]), "1")
    (one,) = store.load(tmp_path / "one")
    (two,) = store.load(tmp_path / "two")
    busybox = store.get("busybox")
    for image in (one, two, busybox):
        store.rootfs(image)
    before = store.disk_usage()
    assert store.gc() == 0
    assert store.remove("two:1") == ["two:1"]
    assert [i.name for i in store.images()] == ["busybox:latest", "one:1.0"]
    freed = store.gc()
    assert freed > 100_000
    assert store.disk_usage() < before
    assert not store.blobs.exists(two.layers[0]) and not store.blobs.exists(two.digest)
    assert store.blobs.exists(one.layers[0])
    assert not (store.root / "rootfs" / two.chain_id[7:]).exists()
    assert store.rootfs(one).is_dir()
    # a rootfs in use survives gc even after its image is removed
    with store.use(busybox) as path:
        store.remove("busybox")
        store.gc()
        assert (path / "bin/busybox").is_file()
    store.gc()
    assert not path.exists()


def test_rootfs_is_a_read_only_overlay_lowerdir(tmp_path: Path, store: ImageStore) -> None:
    image = store.get("busybox")
    lower = store.rootfs(image)
    before = sorted(str(p.relative_to(lower)) for p in lower.rglob("*"))
    upper, work, merged = (tmp_path / d for d in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged))
    try:
        (merged / "tmp/new").write_text("container data")
        (merged / "etc/passwd").write_text("changed\n")
        (merged / "bin/busybox").unlink()
    finally:
        run("umount", str(merged))
    assert sorted(str(p.relative_to(lower)) for p in lower.rglob("*")) == before
    assert "root:x:0:0" in (lower / "etc/passwd").read_text()
    assert store.rootfs(image) == lower


def test_failed_unpack_leaves_nothing_complete(tmp_path: Path, store: ImageStore) -> None:
    layout = Layout(tmp_path / "evil")
    layout.add(layout.image([tar_layer(file("ok", b"1")),
                             tar_layer(symlink("x", "/etc"), file("x/pwned", b"x"))]), "1")
    (image,) = store.load(tmp_path / "evil")
    with pytest.raises(UnsafeLayer, match="through symlinks"):
        store.rootfs(image)
    assert [p.name for p in (store.root / "rootfs").iterdir()
            if not p.name.endswith(".lock")] == []
    assert list((store.root / "tmp").iterdir()) == []
    assert not Path("/etc/pwned").exists()


def test_killed_unpack_is_redone(tmp_path: Path, store: ImageStore) -> None:
    layout = Layout(tmp_path / "big")
    layout.add(layout.image([tar_layer(*(file(f"d{i}/f{j}", b"z" * 4096) for i in range(30)
                                         for j in range(60)))]), "1")
    (image,) = store.load(tmp_path / "big")
    script = ("import sys; from pathlib import Path; from runv_py.oci.image import ImageStore; "
              "s = ImageStore(Path(sys.argv[1])); s.rootfs(s.get('big:1'))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(store.root)])
    try:
        deadline = time.monotonic() + 60
        while not any((store.root / "tmp").glob("rootfs-*/d1")):
            assert proc.poll() is None and time.monotonic() < deadline, "unpack did not start"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    assert not (store.root / "rootfs" / image.chain_id[7:]).exists()
    rootfs = store.rootfs(image)
    assert len(list(rootfs.glob("d*/f*"))) == 1800
    assert store.gc() > 0          # the killed unpack's half tree
    assert list((store.root / "tmp").iterdir()) == []


def test_damaged_store_is_reported_not_fatal(tmp_path: Path, store: ImageStore) -> None:
    make_layout(tmp_path / "one")
    (one,) = store.load(tmp_path / "one")
    busybox = store.get("busybox")
    store.blobs.path(one.layers[0]).unlink()
    assert store.images() == [busybox]
    with pytest.raises(ImageError, match=r"is missing.*pull or load the image again"):
        store.get("one:1.0")


def test_inspect_shows_names_config_and_manifest(store: ImageStore) -> None:
    image = store.get("busybox")
    details = store.inspect("busybox")
    assert details["Id"] == image.id and details["RepoTags"] == ["busybox:latest"]
    assert details["Config"]["Cmd"] == ["sh"]
    assert details["Manifest"]["layers"][0]["digest"] == image.layers[0]
    assert details["RootFS"]["diff_ids"] == list(image.diff_ids)
    assert details["Size"] == image.size > 1_000_000


def docker_save_tar(path: Path, layers: list[bytes], diff_ids: list[str]) -> None:
    """An old-style `docker save` tarball: <id>/layer.tar, <id>.json, manifest.json."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/x"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    members = {"cfg.json": config, "manifest.json": json.dumps([{
        "Config": "cfg.json", "RepoTags": ["hand:1"],
        "Layers": [f"l{i}/layer.tar" for i in range(len(layers))]}]).encode()}
    members |= {f"l{i}/layer.tar": layer for i, layer in enumerate(layers)}
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_load_old_docker_save_with_gzip_and_plain_layers(tmp_path: Path,
                                                         store: ImageStore) -> None:
    plain = tar_layer(file("a", b"plain"))
    packed = tar_layer(file("b", b"packed"))
    docker_save_tar(tmp_path / "hand.tar", [plain, gzip.compress(packed)],
                    [digest(plain), digest(packed)])
    (image,) = store.load(tmp_path / "hand.tar")
    assert image.name == "hand:1" and image.layers[0] == digest(plain)
    rootfs = store.rootfs(image)
    assert (rootfs / "a").read_bytes() == b"plain" and (rootfs / "b").read_bytes() == b"packed"


def test_load_docker_save_with_a_layer_not_matching_its_diff_id(tmp_path: Path,
                                                                store: ImageStore) -> None:
    layer = tar_layer(file("a", b"plain"))
    docker_save_tar(tmp_path / "bad.tar", [layer], [digest(b"other")])
    with pytest.raises(ImageError, match=digest(b"other")):
        store.load(tmp_path / "bad.tar")
    assert store.images() == []
    assert not store.blobs.exists(digest(layer))


def test_gc_waits_for_running_pulls_and_unpacks(tmp_path: Path, store: ImageStore) -> None:
    """Blobs a pull has stored but not named yet are not freed under it."""
    import threading

    with store.writing():
        digest_ = store.blobs.put(b"fetched, not yet named")
        done = threading.Event()
        threading.Thread(target=lambda: (store.gc(), done.set()), daemon=True).start()
        assert not done.wait(0.5)
        assert store.blobs.exists(digest_)
    assert done.wait(10)
    assert not store.blobs.exists(digest_)


def test_load_multi_platform_layout_picks_the_platform(tmp_path: Path,
                                                       store: ImageStore) -> None:
    layout = Layout(tmp_path / "multi")
    amd = layout.image([tar_layer(file("arch", b"amd64"))], arch="amd64")
    arm = layout.image([tar_layer(file("arch", b"arm64"))], arch="arm64")
    layout.add(layout.index([amd, arm]), "1")
    (image,) = store.load(tmp_path / "multi", platform="linux/arm64")
    assert image.architecture == "arm64"
    assert (store.rootfs(image) / "arch").read_text() == "arm64"
    with pytest.raises(ImageError, match="no manifest for platform linux/s390x"):
        store.load(tmp_path / "multi", platform="linux/s390x")


def test_derived_files_are_made_once_and_freed_with_their_rootfs(tmp_path: Path,
                                                                 store: ImageStore) -> None:
    make_layout(tmp_path / "one")
    (one,) = store.load(tmp_path / "one")
    busybox = store.get("busybox")
    built: list[Path] = []

    def build(rootfs: Path, target: Path) -> None:
        built.append(rootfs)
        target.write_bytes(b"made from " + str(rootfs).encode())

    first = store.derived(busybox, ".img", build)
    assert store.derived(busybox, ".img", build) == first and len(built) == 1
    assert first.name == store.rootfs(busybox).name + ".img"
    assert first.read_bytes() == b"made from " + str(store.rootfs(busybox)).encode()
    assert not first.stat().st_mode & 0o222   # read-only: every container shares it

    def fail(rootfs: Path, target: Path) -> None:
        target.write_bytes(b"half")
        raise ImageError("mkfs failed")

    with pytest.raises(ImageError):
        store.derived(one, ".img", fail)
    assert not (store.root / "rootfs" / (one.chain_id[7:] + ".img")).exists()
    assert not list(store.blobs.tmp.iterdir())
    kept = store.derived(one, ".img", build)
    assert store.gc() == 0 and kept.is_file() and first.is_file()
    store.remove("busybox")
    assert store.gc() > 0
    assert not first.exists() and not store.rootfs(one).with_name(first.name).exists()
    assert kept.is_file()
