from __future__ import annotations

from tests.vm.conftest import runtime_config  # noqa: F401  (the VM fixture, for vsock tests)
