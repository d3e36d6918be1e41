"""The CLI, hyperctl and shim tests again, with `[hypervisor] backend = "libvirt"` against a
libvirtd of the session's own (tests/libvirtd.py): its sandboxes are libvirt domains."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cli.conftest import runv, subreaper  # noqa: F401 (their fixtures, here too)
from tests.hyperctl.conftest import hyperctl  # noqa: F401
from tests.integration.conftest import image_archive, runtime_env  # noqa: F401
from tests.integration.test_shim import cd, shim_env  # noqa: F401
from tests.libvirtd import PrivateLibvirtd
from tests.network.conftest import lab  # noqa: F401
from tests.vm.conftest import runtime_config  # noqa: F401


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[PrivateLibvirtd]:
    daemon = PrivateLibvirtd().start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def hypervisor_toml(libvirtd: PrivateLibvirtd) -> str:
    return f'backend = "libvirt"\nlibvirt_uri = "{libvirtd.uri}"\n'


@pytest.fixture(scope="module", autouse=True)
def no_domain_left(libvirtd: PrivateLibvirtd) -> Iterator[None]:
    """Every sandbox a module's tests started is gone from libvirt with them."""
    yield
    left = libvirtd.domains()
    for name in left:
        libvirtd.virsh("destroy", name, check=False)
    assert not left, f"domains left behind: {left}"
