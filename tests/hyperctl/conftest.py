"""Fixtures for driving `hyperctl` as a user does: subprocesses with roots and a runtime config
of the test's own, and a check that no VM, supervisor, monitor or state outlives the test."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import processes_mentioning

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")


class Hyperctl:
    def __init__(self, top: Path, assets_dir: Path, hypervisor_toml: str = "") -> None:
        self.top = top
        self.root = Path(tempfile.mkdtemp(prefix="hc-r-"))
        self.data = top / "data"
        self.state = Path(tempfile.mkdtemp(prefix="hc-s-"))
        self.config = top / "config.toml"
        self.config.write_text(f'state_dir = "{self.state}"\n[hypervisor]\nboot_timeout_s = 90\n'
                               + hypervisor_toml)
        self.env = dict(os.environ, RUNV_CONFIG=str(self.config), HYPERCTL_ROOT=str(self.root),
                        HYPERCTL_DATA_ROOT=str(self.data), RUNV_ASSETS_DIR=str(assets_dir))
        self.env.pop("NOTIFY_SOCKET", None)

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None,
                 timeout: float = 240, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """Output through files: a detached container's monitor must not hold our pipes."""
        if input is None and "stdin" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            kw.setdefault("stdout", out)
            kw.setdefault("stderr", err)
            result = subprocess.run([HYPERCTL, *args], input=input, timeout=timeout,
                                    env=self.env, check=False, **kw)
            out.seek(0)
            err.seek(0)
            result.stdout, result.stderr = out.read(), err.read()
        if check and result.returncode != 0:
            raise AssertionError(f"hyperctl {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def in_pty(self, *args: str, timeout_s: float = 240) -> tuple[int, bytes]:
        """Run hyperctl on a new terminal, as a user at a shell would: (status, output)."""
        master, slave = pty.openpty()
        proc = subprocess.Popen([HYPERCTL, *args], stdin=slave, stdout=slave, stderr=slave,
                                env=self.env)
        os.close(slave)
        output = b""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if select.select([master], [], [], 1)[0]:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:  # EIO: every holder of the terminal closed it
                        break
                    if not chunk:
                        break
                    output += chunk
                elif proc.poll() is not None:
                    break
        finally:
            os.close(master)
        return proc.wait(30), output

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self("inspect", name).stdout)[0])

    def tenants(self) -> list[str]:
        return sorted(os.listdir(self.data / "tenants")) if (self.data / "tenants").is_dir() \
            else []

    def leftovers(self) -> list[str]:
        found = []
        for text in (str(self.root), str(self.state), str(self.data)):
            found += processes_mentioning(text)
        for base in (self.root, self.state / "sandboxes", self.data / "containers",
                     *(self.data / "tenants" / t / "containers" for t in self.tenants())):
            if base.exists():
                found += [f"state: {p}" for p in base.iterdir()]
        return found

    def clean(self) -> list[str]:
        """Remove every container (of every tenant); what is left afterwards."""
        for tenant, containers in ((None, self.data / "containers"), *(
                (t, self.data / "tenants" / t / "containers") for t in self.tenants())):
            if containers.exists():
                for cid in os.listdir(containers):
                    self(*(("--tenant", tenant) if tenant else ()), "rm", "-f", cid,
                         check=False)
        left = self.leftovers()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        return left


@pytest.fixture
def hyperctl(tmp_path: Path, assets_dir: Path, hypervisor_toml: str) -> Iterator[Hyperctl]:
    tool = Hyperctl(tmp_path, assets_dir, hypervisor_toml)
    yield tool
    left = tool.clean()
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def shared_hyperctl(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path,
                    hypervisor_toml: str) -> Iterator[Hyperctl]:
    """One set of roots for a module's tests that share a detached container."""
    tool = Hyperctl(tmp_path_factory.mktemp("hyperctl"), assets_dir, hypervisor_toml)
    yield tool
    left = tool.clean()
    assert not left, f"left behind: {left}"
