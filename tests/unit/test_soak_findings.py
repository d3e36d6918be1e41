"""How the fault-injection soak (bench/soak.py) judges one operation's result."""

from __future__ import annotations

import os
from pathlib import Path

from bench import soak


def _result(op: str, code: int | None, error: str = "") -> soak.OpResult:
    return soak.OpResult(op, code, error, 0.1)


def test_a_failure_counts_unless_a_fault_explains_it_or_runc_would_fail_too(
        tmp_path: Path) -> None:
    door = soak.RunvDoor(tmp_path, dict(os.environ), tmp_path / "state")
    refused = _result("delete", 1, "runv: error: cannot delete container sk135xca47 that is "
                                   "not stopped: running (use --force)")
    # A plan's plain delete of its running container (the soak's run H #136 counted it).
    assert soak.op_finding(door, refused, faulted=False) == ""
    assert soak.op_finding(door, _result("exec", 1, "runv: error: boom"), faulted=False) == \
        "exec failed before any fault: runv: error: boom"
    assert soak.op_finding(door, _result("delete", 1, "runv: error: boom"), faulted=False)
    assert soak.op_finding(door, _result("exec", 1, "runv: error: boom"), faulted=True) == ""
    assert soak.op_finding(door, _result("exec", None), faulted=True).startswith(
        "exec did not end within")
    assert soak.op_finding(door, _result("exec", 1, "TRACEBACK: x"), faulted=True) == \
        "exec failed with a traceback: TRACEBACK: x"
    assert soak.op_finding(door, _result("create", 0), faulted=False) == ""
    # Only runv's door knows runc's refusal.
    assert soak.op_finding(soak.Door(tmp_path, {}), refused, faulted=False)
