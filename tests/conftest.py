from __future__ import annotations

import os
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The built guest assets (`make assets`); tests that need them fail, never skip, without."""
    path = Path(os.environ.get("RUNV_ASSETS_DIR", "/var/cache/runv-py/assets"))
    if not (path / "kernel" / "config").is_file():
        pytest.fail(f"guest assets not found in {path}: run `make assets` first")
    return path
