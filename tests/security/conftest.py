"""Shared fixtures of the security tests: the hyperctl/API roots of a test's own (the checks
that nothing outlives the test come with them). One test file per boundary sits beside this."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401  (fixture)


@pytest.fixture
def api_roots(hyperctl: Hyperctl,  # noqa: F811
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Hyperctl]:
    """runv_py.api in this process, with the hyperctl fixture's roots and runtime config."""
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    yield hyperctl
