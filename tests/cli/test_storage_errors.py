"""A full or read-only state root (`/run`), a full data root (`/var/lib/hyperctl`) or a missing
asset cache: one error line that names the path, a non-zero exit, and nothing made (no
process, no state, no record). Each file system is a small tmpfs of the test's own; the
commands find it through the flags and the environment they already have. Also: a data root
that fills up half-way through (the image unpacks, the container's layer does not fit) leaves
no record behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import processes_mentioning

from .conftest import Runv

HYPERCTL = str(Path(sys.executable).parent / "hyperctl")


@contextlib.contextmanager
def small_fs(path: Path, size: str, *, fill: bool = False, read_only: bool = False
             ) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "gc-test", str(path)],
                   check=True)
    try:
        if fill:
            subprocess.run(["dd", "if=/dev/zero", f"of={path / 'fill'}", "bs=64k"],
                           capture_output=True, check=False)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def contents(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.name != "fill")


def one_error_line(result: subprocess.CompletedProcess[bytes], prog: str) -> str:
    lines = [line for line in result.stderr.decode().splitlines()
             if not line.startswith(("store: info", "unpack "))]
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


@pytest.fixture
def runv_tool(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Runv]:
    tool = Runv(tmp_path, busybox_rootfs)
    yield tool
    assert not tool.leftovers()


@pytest.mark.parametrize("where", ["root", "state_dir"])
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_runv_create_on_a_full_or_read_only_state_root(runv_tool: Runv, tmp_path: Path,
                                                       where: str, how: str) -> None:
    bundle = runv_tool.bundle(["true"])
    with small_fs(tmp_path / "small", "256k", fill=how == "full",
                  read_only=how == "read-only") as small:
        if where == "root":
            runv_tool.root = small / "root"
        else:
            runv_tool.config.write_text(f'state_dir = "{small / "state"}"\n')
        result = runv_tool("create", "-b", str(bundle), "c1", check=False)
        line = one_error_line(result, "runv")
        assert str(small) in line, line
        assert ("read-only" if how == "read-only" else "no space left") in line, line
        assert contents(small) == []
        assert not processes_mentioning(str(small))


def test_runv_create_without_the_asset_cache(runv_tool: Runv, tmp_path: Path) -> None:
    bundle = runv_tool.bundle(["true"])
    runv_tool.env["RUNV_ASSETS_DIR"] = str(tmp_path / "no-cache")
    line = one_error_line(runv_tool("create", "-b", str(bundle), "c1", check=False), "runv")
    assert str(tmp_path / "no-cache") in line, line
    assert not runv_tool.root.exists() or contents(runv_tool.root) == []


def hyperctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([HYPERCTL, *args], env=env, capture_output=True, timeout=240,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def hyperctl_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n')
    env = dict(os.environ, RUNV_CONFIG=str(tmp_path / "config.toml"),
               HYPERCTL_ROOT=str(tmp_path / "root"), HYPERCTL_DATA_ROOT=str(tmp_path / "data"))
    env.pop("NOTIFY_SOCKET", None)
    return env


@pytest.mark.parametrize("root", ["HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"])
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_hyperctl_run_on_a_full_or_read_only_root(hyperctl_env: dict[str, str],
                                                  tmp_path: Path, root: str,
                                                  how: str) -> None:
    with small_fs(tmp_path / "small", "256k", fill=how == "full",
                  read_only=how == "read-only") as small:
        hyperctl_env[root] = str(small / "x")
        line = one_error_line(hyperctl(hyperctl_env, "run", "--rm", "busybox", "true"),
                              "hyperctl")
        assert str(small / "x") in line, line
        assert contents(small) == []
        assert not processes_mentioning(str(small))


def test_hyperctl_run_without_the_asset_cache(hyperctl_env: dict[str, str],
                                              tmp_path: Path) -> None:
    hyperctl_env["RUNV_ASSETS_DIR"] = str(tmp_path / "no-cache")
    line = one_error_line(hyperctl(hyperctl_env, "run", "--rm", "busybox", "true"),
                          "hyperctl")
    assert str(tmp_path / "no-cache") in line, line
    assert not (tmp_path / "data").exists()


def test_a_data_root_that_fills_half_way_keeps_no_record(hyperctl_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    # Room for the image (busybox, 2.1 MB unpacked) and the container's record, not for
    # its block rootfs (the image as erofs, then its disk).
    with small_fs(tmp_path / "small", "5m") as small:
        hyperctl_env["HYPERCTL_DATA_ROOT"] = str(small)
        result = hyperctl(hyperctl_env, "run", "--rm", "--rootfs", "block", "--disk", "64m",
                          "busybox", "true")
        line = one_error_line(result, "hyperctl")
        assert str(small) in line, line
        assert contents(small / "containers") == [] and contents(small / "names") == []
        assert not processes_mentioning(str(small))
