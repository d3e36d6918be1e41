from __future__ import annotations

import os
import subprocess
from pathlib import Path

from runv_py.child import proc_start_time
from runv_py.sandbox.vm_dir import sweep_stale


def test_only_sandboxes_of_dead_owners_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = os.getpid()
    cases = {
        "dead": f"{dead.pid} 12345\n",
        "alive": f"{me} {proc_start_time(me)}\n",
        "reused-pid": f"{me} 1\n",   # same pid, other start time: a different process
    }
    for name, owner in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner").write_text(owner)
    (tmp_path / "foreign").mkdir()  # no owner file: not ours to remove
    assert sorted(sweep_stale(tmp_path)) == ["dead", "reused-pid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alive", "foreign"]
    assert sweep_stale(tmp_path / "absent") == []


def test_start_time_of_a_missing_pid_is_none() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert proc_start_time(dead.pid) is None
    assert proc_start_time(os.getpid()) is not None
