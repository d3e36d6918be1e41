"""The shape of the code that keeps it readable: one module spells the control protocol's keys,
and imports run downwards (the import-linter contracts in pyproject.toml, run by `make lint`,
checked here too so that `make test` alone catches a violation)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
PROTOCOL = TOP / "runv_py" / "sandbox" / "protocol.py"
# Keys that only the supervisor's and the pool's control messages use (protocol.py): a module
# that spells one builds or reads a control message by hand.
CONTROL_KEYS = {"op", "ok", "exec_id", "sandbox_gone", "vm_dir", "start_path",
                "qemu_pid", "spawned_at", "trees", "cgroups", "claimed", "claimed_running",
                "idle_state", "memory_ceiling_mib", "timings", "why", "ctl", "exit_status"}


def _spelled_keys(path: Path) -> list[tuple[str, int]]:
    """String constants used as dict keys, subscripts or .get() keys."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            keys = [k for k in node.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys = [node.slice]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and node.args
              and isinstance(node.args[0], ast.Constant)):
            keys = [node.args[0]]
        else:
            continue
        found += [(k.value, k.lineno) for k in keys if isinstance(k.value, str)]
    return found


def test_only_the_protocol_module_spells_control_message_keys() -> None:
    offenders = [f"{path.relative_to(TOP)}:{line}: {key!r}"
                 for path in sorted((TOP / "runv_py").rglob("*.py"))
                 if path != PROTOCOL and "_pb" not in path.parts
                 for key, line in _spelled_keys(path) if key in CONTROL_KEYS]
    assert offenders == []


def test_the_check_sees_a_hand_built_message(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('def f(c, m):\n    c.send({"op": "kill"})\n    return m.get("ok")\n')
    assert sorted(key for key, _ in _spelled_keys(sample) if key in CONTROL_KEYS) == ["ok", "op"]


def test_imports_run_downwards_with_no_circle() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=TOP, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
