"""A hostile registry (a server of our own on a local address) against the registry client:
credentials never travel over plain HTTP after a redirect or to a plain-HTTP token realm,
redirects and token realms never lead to loopback or link-local services unless the registry is
one itself, and the sizes a manifest announces are capped before anything is fetched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runv_py.errors import ImageError, RegistryError
from runv_py.oci.image import Credentials, ImageStore
from tests.image.conftest import Certs, make_certs

from .hostile_registry import (
    OCI_MANIFEST,
    HostileRegistry,
    challenge,
    digest_of,
    endless,
    json_answer,
    manifest,
    redirect,
)

TOP = Path(__file__).resolve().parents[2]
REPO = "team/app"
CREDS = Credentials("tester", "s3cret")


@pytest.fixture
def serve() -> Iterator[Callable[..., HostileRegistry]]:
    started: list[HostileRegistry] = []

    def start(**kw: object) -> HostileRegistry:
        registry = HostileRegistry(**kw)  # type: ignore[arg-type]
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls") / "certs")


def _pull(tmp_path: Path, ref: str, **kw: object) -> None:
    asyncio.run(ImageStore(tmp_path / "store").pull(ref, **kw))  # type: ignore[arg-type]


def test_no_authorization_after_a_redirect_to_plain_http(
        tmp_path: Path, serve: Callable[..., HostileRegistry], certs: Certs) -> None:
    """The registry takes Basic credentials over HTTPS, then redirects to plain HTTP on the
    same host and port: the client refuses the downgrade and the header never goes out in
    the clear."""
    reg = serve(cert=(certs.cert, certs.key), dual=True)
    reg.routes[f"/v2/{REPO}/manifests/1"] = challenge(
        'Basic realm="hostile"',
        then=redirect(f"http://{reg.host}/v2/{REPO}/manifests/1"))
    with pytest.raises(RegistryError, match="from https to http"):
        _pull(tmp_path, f"{reg.host}/{REPO}:1", ca_file=certs.ca, credentials=CREDS)
    plain = [r for r in reg.seen if r.scheme == "http"]
    assert not [r for r in plain if "Authorization" in r.headers], plain


def test_basic_credentials_only_to_an_https_token_realm(
        tmp_path: Path, serve: Callable[..., HostileRegistry], certs: Certs) -> None:
    tokens = serve()
    reg = serve(cert=(certs.cert, certs.key))
    reg.routes[f"/v2/{REPO}/manifests/1"] = challenge(
        f'Bearer realm="http://{tokens.host}/token",service="hostile"')
    with pytest.raises(RegistryError, match="plain-HTTP token realm"):
        _pull(tmp_path, f"{reg.host}/{REPO}:1", ca_file=certs.ca, credentials=CREDS)
    assert not [r for r in tokens.seen if "Authorization" in r.headers], tokens.seen


def test_config_larger_than_the_cap_is_not_fetched(
        tmp_path: Path, serve: Callable[..., HostileRegistry]) -> None:
    reg = serve()
    config = (digest_of(b"config"), 64 << 20)
    reg.routes[f"/v2/{REPO}/manifests/1"] = json_answer(manifest(config, []), OCI_MANIFEST)
    reg.routes[f"/v2/{REPO}/blobs/{config[0]}"] = endless(config[1], config[1])
    with pytest.raises(ImageError, match="config of 67108864 bytes is larger than"):
        _pull(tmp_path, f"{reg.host}/{REPO}:1")
    assert not reg.paths(f"/v2/{REPO}/blobs/")


def test_layer_larger_than_the_cap_is_not_fetched(
        tmp_path: Path, serve: Callable[..., HostileRegistry]) -> None:
    reg = serve()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [digest_of(b"l")]},
                         "architecture": "amd64", "os": "linux"}).encode()
    layer = (digest_of(b"layer"), 1 << 40)
    reg.routes[f"/v2/{REPO}/manifests/1"] = json_answer(
        manifest((digest_of(config), len(config)), [layer]), OCI_MANIFEST)
    reg.routes[f"/v2/{REPO}/blobs/{digest_of(config)}"] = json_answer(json.loads(config))
    reg.routes[f"/v2/{REPO}/blobs/{layer[0]}"] = endless(layer[1], 1 << 20)
    with pytest.raises(ImageError, match="layers\\[0\\] of 1099511627776 bytes is larger than"):
        _pull(tmp_path, f"{reg.host}/{REPO}:1")
    assert not reg.paths(f"/v2/{REPO}/blobs/")


def test_redirects_and_realms_stay_out_of_loopback_and_link_local() -> None:
    """In a network namespace of its own: a registry on 192.0.2.10 (not loopback) and one on
    127.0.0.1, with services on loopback and on 169.254.169.254 that must see no request."""
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-m", "tests.security.registry_netns"],
        cwd=TOP, capture_output=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(TOP)})
    assert result.returncode == 0, result.stderr.decode()
    outcomes = json.loads(result.stdout)
    for name, outcome in outcomes.items():
        if name == "same-class redirect":
            assert outcome["error"] is None, outcome
            continue
        assert outcome["error"] and outcome["kind"] in outcome["error"], (name, outcome)
        assert outcome["hits"] == 0, (name, outcome)
