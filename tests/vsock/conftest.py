from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import runtime_config  # noqa: F401  (the VM fixture, for vsock tests)

from .driver import Driver


@pytest.fixture(params=["mmap", "process"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Driver]:
    """A modelled guest driver with both rings set up and rx buffers posted; the device maps
    the guest's memory (cold boots) or reaches it through /proc/<pid>/mem (template clones)."""
    d = Driver(tmp_path, process=request.param == "process")
    d.start()
    d.post_rx()
    yield d
    d.close()
