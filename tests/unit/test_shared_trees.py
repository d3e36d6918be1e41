"""Detached mount trees as they travel in a control message to a supervisor (shared.Trees)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py.errors import ConfigError, RunvError
from runv_py.storage.shared import Trees


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_collection() -> Iterator[None]:
    """Objects left by earlier tests (sockets, files) close their fds when the collector runs;
    collecting first and pausing it keeps those closes out of the counts below."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collection")
def test_trees_round_trip_and_bad_input_leaves_no_fd(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "file").write_text("x")
    before = _open_fds()

    trees = Trees.of(tmp_path / "root", {3: tmp_path / "file"})
    names, fds = trees.wire()
    assert names == ["root", 3] and len(fds) == 2
    back = Trees.from_wire(names, fds)
    assert (back.rootfs, back.binds) == (trees.rootfs, trees.binds)
    back.close()
    assert _open_fds() - before == set()

    with pytest.raises(ConfigError, match=r"^mounts\[4\]\.source: .*/absent does not exist$"):
        Trees.of(tmp_path / "root", {3: tmp_path / "file", 4: tmp_path / "absent"})
    assert _open_fds() - before == set()

    for bad_names in (["root"], ["root", "x"]):
        _, fds = Trees.of(tmp_path / "root", {3: tmp_path / "file"}).wire()
        with pytest.raises(RunvError, match="mount trees came"):
            Trees.from_wire(bad_names, fds)
        assert _open_fds() - before == set()
