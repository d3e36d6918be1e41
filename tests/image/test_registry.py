"""Pulls from a real registry (Debian's docker-registry on 127.0.0.1, filled by skopeo)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runv_py.errors import DigestMismatch, ImageError, RegistryError
from runv_py.oci.image import Credentials, Image, ImageStore, Progress, ProgressTask

from .builder import Layout, file, tar_layer
from .conftest import PASSWORD, USER, Registry


def small_layout(path: Path, *, arch: str = "amd64", payload: bytes = b"") -> Layout:
    layout = Layout(path)
    desc = layout.image([tar_layer(file("etc/arch", arch.encode()), file("bin/tool", b"#!x",
                                                                        0o755)),
                         tar_layer(file("data/payload", payload))], arch=arch)
    layout.add(desc, "v1")
    return layout


def pull(store: ImageStore, ref: str, **kw: Any) -> Image:
    return asyncio.run(store.pull(ref, **kw))


def test_anonymous_http_pull_and_unpack(tmp_path: Path, store: ImageStore,
                                        registry: Callable[..., Registry]) -> None:
    reg = registry()
    small_layout(tmp_path / "layout")
    reg.push(tmp_path / "layout", "v1", "team/tool:1.0")
    out = io.StringIO()
    image = asyncio.run(store.pull(f"{reg.host}/team/tool:1.0", progress=Progress(out)))
    assert image.name == f"{reg.host}/team/tool:1.0"
    assert image.config.cmd == ("sh",) and image.architecture == "amd64"
    assert len(image.layers) == 2
    assert "pulled" in out.getvalue()      # plain progress lines, not a terminal
    assert "\x1b[" not in out.getvalue()
    rootfs = store.rootfs(image)
    assert (rootfs / "etc/arch").read_text() == "amd64"
    assert [i.name for i in store.images()] == [image.name]
    # pulling again downloads nothing
    again = io.StringIO()
    assert asyncio.run(store.pull(f"{reg.host}/team/tool:1.0", progress=Progress(again))) \
        == image
    assert again.getvalue() == ""


def test_missing_tag_is_a_clear_error(store: ImageStore,
                                      registry: Callable[..., Registry]) -> None:
    reg = registry()
    with pytest.raises(RegistryError, match="not found in the registry"):
        pull(store, f"{reg.host}/nothing/here:1")
    assert store.images() == []


def test_https_with_test_ca(tmp_path: Path, store: ImageStore,
                            registry: Callable[..., Registry]) -> None:
    reg = registry(tls=True)
    assert reg.certs is not None
    small_layout(tmp_path / "layout")
    reg.push(tmp_path / "layout", "v1", "secure/tool:1")
    ref = f"{reg.host}/secure/tool:1"
    with pytest.raises(RegistryError, match=r"not trusted.*--ca-file"):
        pull(store, ref)
    image = pull(store, ref, ca_file=reg.certs.ca)
    assert image.name == ref
    # --insecure skips verification for a TLS registry too
    other = ImageStore(tmp_path / "other")
    assert pull(other, ref, insecure=True) == image


def test_bearer_token_auth(tmp_path: Path, store: ImageStore,
                           registry: Callable[..., Registry]) -> None:
    reg = registry(token=True)
    assert reg.token is not None
    small_layout(tmp_path / "layout")
    reg.push(tmp_path / "layout", "v1", "private/tool:1")
    ref = f"{reg.host}/private/tool:1"
    with pytest.raises(RegistryError, match=r"token server refused.*credentials"):
        pull(store, ref)
    with pytest.raises(RegistryError, match="token server refused"):
        pull(store, ref, credentials=Credentials(USER, "wrong"))
    image = pull(store, ref, credentials=Credentials(USER, PASSWORD))
    assert store.rootfs(image).joinpath("etc/arch").read_text() == "amd64"
    assert any("scope=repository%3Aprivate%2Ftool%3Apull" in r for r in reg.token.requests)


def test_basic_auth_over_https(tmp_path: Path, store: ImageStore,
                               registry: Callable[..., Registry]) -> None:
    reg = registry(tls=True, basic=True)
    assert reg.certs is not None
    small_layout(tmp_path / "layout")
    reg.push(tmp_path / "layout", "v1", "basic/tool:1")
    ref = f"{reg.host}/basic/tool:1"
    with pytest.raises(RegistryError, match="asks for a user name and password"):
        pull(store, ref, ca_file=reg.certs.ca)
    with pytest.raises(RegistryError, match=r"access denied \(401\).*credentials"):
        pull(store, ref, ca_file=reg.certs.ca, credentials=Credentials(USER, "wrong"))
    image = pull(store, ref, ca_file=reg.certs.ca, credentials=Credentials(USER, PASSWORD))
    assert store.rootfs(image).joinpath("etc/arch").read_text() == "amd64"


def test_index_with_two_platforms(tmp_path: Path, store: ImageStore,
                                  registry: Callable[..., Registry]) -> None:
    reg = registry()
    layout = Layout(tmp_path / "layout")
    amd = layout.image([tar_layer(file("etc/arch", b"amd64"))], arch="amd64")
    arm = layout.image([tar_layer(file("etc/arch", b"arm64"))], arch="arm64")
    layout.add(layout.index([amd, arm]) | {"mediaType":
                                           "application/vnd.oci.image.index.v1+json"}, "multi")
    reg.push(tmp_path / "layout", "multi", "multi/arch:1", all_platforms=True)
    ref = f"{reg.host}/multi/arch:1"
    arm_image = pull(store, ref, platform="linux/arm64")
    assert arm_image.architecture == "arm64"
    assert store.rootfs(arm_image).joinpath("etc/arch").read_text() == "arm64"
    amd_image = pull(ImageStore(tmp_path / "s2"), ref)
    assert amd_image.architecture == "amd64"
    with pytest.raises(ImageError, match=r"no manifest for platform linux/s390x.*linux/amd64"):
        pull(ImageStore(tmp_path / "s3"), ref, platform="linux/s390x")


class Interrupt(Exception):
    pass


class InterruptingProgress(Progress):
    """Interrupts the pull once a big blob is a third through (like a killed process)."""

    def __init__(self) -> None:
        super().__init__(io.StringIO(), tty=False)

    def task(self, label: str, total: int | None, done: int = 0) -> ProgressTask:
        task = super().task(label, total, done)
        if total and total > 1_000_000:
            real_advance = task.advance

            def advance(n: int) -> None:
                real_advance(n)
                if task.done > total // 3:
                    raise Interrupt
            task.advance = advance  # type: ignore[method-assign]
        return task


def test_interrupted_pull_resumes(tmp_path: Path, store: ImageStore,
                                  registry: Callable[..., Registry],
                                  caplog: pytest.LogCaptureFixture) -> None:
    reg = registry()
    small_layout(tmp_path / "layout", payload=os.urandom(6_000_000))
    reg.push(tmp_path / "layout", "v1", "big/tool:1")
    ref = f"{reg.host}/big/tool:1"
    with pytest.raises(Interrupt):
        pull(store, ref, progress=InterruptingProgress())
    assert store.images() == []
    # Other blobs download concurrently and may be cut short too; the big layer's partial
    # download holds more than a third of it.
    sizes = [p.stat().st_size for p in (store.root / "tmp").glob("*.partial")]
    assert any(2_000_000 < size < 6_100_000 for size in sizes), sizes
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="runv_py.oci.image"):
        image = pull(store, ref, progress=Progress(out, tty=False))
    assert "resuming at" in out.getvalue()
    assert "resuming at" in caplog.text and "again from the start" not in caplog.text
    assert len((store.rootfs(image) / "data/payload").read_bytes()) == 6_000_000
    assert list((store.root / "tmp").glob("*.partial")) == []


def test_corrupted_blob_is_rejected(tmp_path: Path, store: ImageStore,
                                    registry: Callable[..., Registry]) -> None:
    reg = registry()
    layout = small_layout(tmp_path / "layout", payload=b"precious" * 1000)
    reg.push(tmp_path / "layout", "v1", "bad/tool:1")
    ref = f"{reg.host}/bad/tool:1"
    image = pull(ImageStore(tmp_path / "probe"), ref)
    victim = reg.blob_file(image.layers[1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=image.layers[1]):
        pull(store, ref)
    assert store.images() == []
    assert not store.blobs.exists(image.layers[1])
    # the bad download is thrown away (other blobs' partial files may stay, to resume)
    assert not (store.root / "tmp" / f"{image.layers[1][7:]}.partial").exists()
    assert layout.path.is_dir()


def test_concurrent_pulls_of_one_image(tmp_path: Path, registry: Callable[..., Registry]) -> None:
    """Two processes pull and unpack the same image into one store at once."""
    import subprocess
    import sys

    reg = registry()
    small_layout(tmp_path / "layout", payload=os.urandom(3_000_000))
    reg.push(tmp_path / "layout", "v1", "shared/tool:1")
    ref = f"{reg.host}/shared/tool:1"
    script = ("import asyncio, sys; from pathlib import Path; "
              "from runv_py.oci.image import ImageStore; s = ImageStore(Path(sys.argv[1])); "
              "i = asyncio.run(s.pull(sys.argv[2])); print(s.rootfs(i))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "store"), ref],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert len({out for out, _ in results}) == 1
    store = ImageStore(tmp_path / "store")
    (image,) = store.images()
    assert (Path(results[0][0].strip()) / "data/payload").stat().st_size == 3_000_000
    assert sorted(p.name for p in (store.root / "rootfs").iterdir()
                  if not p.name.endswith(".lock")) == [image.chain_id[7:]]
    assert list((store.root / "tmp").iterdir()) == []


class CuttingProxy:
    """A TCP proxy to the registry that cuts the first response longer than `cut_after`
    bytes in the middle (a dropped connection)."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                threading.Thread(target=self.pump, args=(client,), daemon=True).start()

    def pump(self, client: socket.socket) -> None:
        host, port = self.upstream.split(":")
        with client, socket.create_connection((host, int(port))) as server:
            def up() -> None:
                with contextlib.suppress(OSError):
                    while data := client.recv(65536):
                        server.sendall(data)
            threading.Thread(target=up, daemon=True).start()
            sent = 0
            with contextlib.suppress(OSError):
                while data := server.recv(65536):
                    client.sendall(data)
                    sent += len(data)
                    if sent > self.cut_after and self.cuts == 0:
                        self.cuts += 1
                        client.shutdown(socket.SHUT_RDWR)
                        return

    def close(self) -> None:
        self.listener.close()


def test_dropped_connection_resumes_within_the_pull(tmp_path: Path, store: ImageStore,
                                                    registry: Callable[..., Registry],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    reg = registry()
    small_layout(tmp_path / "layout", payload=os.urandom(4_000_000))
    reg.push(tmp_path / "layout", "v1", "flaky/tool:1")
    proxy = CuttingProxy(reg.host, 1_500_000)
    try:
        with caplog.at_level(logging.INFO, logger="runv_py.oci.image"):
            image = pull(store, f"{proxy.host}/flaky/tool:1")
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert "resuming at" in caplog.text and "again from the start" not in caplog.text
    assert (store.rootfs(image) / "data/payload").stat().st_size == 4_000_000
