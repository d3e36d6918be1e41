from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import config
from tests.vm.conftest import processes_mentioning, runtime_config  # noqa: F401


@pytest.fixture(scope="session")
def template_dir() -> Iterator[Path]:
    """A template store of this test session's own: its first sandbox builds the template."""
    path = Path(tempfile.mkdtemp(prefix="runv-tmpl-"))
    yield path
    leaked = processes_mentioning(str(path))
    shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture
def template_config(runtime_config: config.RuntimeConfig,  # noqa: F811
                    template_dir: Path) -> config.RuntimeConfig:
    return replace(runtime_config, template="auto", template_dir=template_dir)
