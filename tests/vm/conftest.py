from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import config


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.fixture
def runtime_config(assets_dir: Path) -> Iterator[config.RuntimeConfig]:
    """A config with its own short state dir; the test fails if any VM process or state is
    left behind when it ends."""
    state = Path(tempfile.mkdtemp(prefix="runv-t-"))
    base = config.RuntimeConfig()
    cfg = replace(base, state_dir=state, guest=replace(base.guest, assets_dir=assets_dir),
                  hypervisor=replace(base.hypervisor, boot_timeout_s=90.0))
    # VMs start from templates by default (built on first use, kept between runs).
    if os.environ.get("RUNV_TEMPLATE_DIR"):
        cfg = replace(cfg, template_dir=Path(os.environ["RUNV_TEMPLATE_DIR"]))
    yield cfg
    leaked = processes_mentioning(str(state))
    left = sorted(p.name for p in state.iterdir()) if state.exists() else []
    shutil.rmtree(state, ignore_errors=True)
    assert not leaked, f"processes left behind: {leaked}"
    assert not left, f"state left behind in {state}: {left}"
