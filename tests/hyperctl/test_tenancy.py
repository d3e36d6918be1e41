"""A tenant's job through hyperctl and the API: bounded (processes, output log, captured
output) and invisible to other tenants (ps, exec, logs, stop, rm find nothing of it)."""

from __future__ import annotations

import json
import time

import pytest

from runv_py.api import CommandFailed, Sandbox
from tests.hyperctl.conftest import Hyperctl

pytestmark = pytest.mark.vm

# 12 background sleeps under a limit of 8 processes: a shell that cannot fork gives up.
FORKS = ("sh -c 'for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 20 & echo started $i; done' "
         "2>&1; echo forks-done")


def _forks_stopped(output: bytes) -> int:
    """How many sleeps started before the limit stopped the forks (asserting it did)."""
    started = [int(line.split()[1]) for line in output.splitlines()
               if line.startswith(b"started ")]
    assert b"can't fork" in output and b"forks-done" in output, output[-400:]
    assert started and started[-1] < 8, output[-400:]
    return started[-1]


def test_a_tenants_job_is_bounded_and_hidden_from_other_tenants(hyperctl: Hyperctl) -> None:
    a, b = ("--tenant", "a"), ("--tenant", "b")
    # 100 kB of output into a log rotated at 16 kB, then the fork loop
    script = ("i=0; while [ $i -lt 1000 ]; do echo line-$i-....................................."
              "............................; i=$((i+1)); done; " + FORKS + "; echo end; "
              "exec sleep 600")
    hyperctl(*a, "run", "-d", "--name", "job", "--pids-limit", "8", "--log-max-size", "16k",
             "busybox", "sh", "-c", script)
    cid = json.loads(hyperctl(*a, "inspect", "job").stdout)[0]["id"]

    # tenant b (and the operator's scope) sees nothing of it, by name or id
    assert json.loads(hyperctl(*b, "ps", "-a", "--format", "json").stdout) == []
    assert json.loads(hyperctl("ps", "-a", "--format", "json").stdout) == []
    for command in (("exec", "job", "true"), ("logs", "job"), ("stop", "job"),
                    ("rm", "-f", "job"), ("exec", cid, "true"), ("rm", "-f", cid)):
        done = hyperctl(*b, *command, check=False)
        assert done.returncode != 0 and b"no such container" in done.stderr.lower(), (
            command, done.stderr)
    # b has its own name space: the name "job" is free there
    assert not (hyperctl.data / "tenants" / "b" / "names" / "job").exists()

    log = hyperctl.data / "tenants" / "a" / "containers" / cid / "output.log"
    out = b""
    for _ in range(600):
        out = hyperctl(*a, "logs", "job").stdout
        if out.endswith(b"end\n"):
            break
        time.sleep(1)
    assert out.endswith(b"end\n"), out[-300:]
    # the pids limit: 8 processes (the shells, the sleeps) and no more
    _forks_stopped(out)
    # the log: rotated at 16 kB, at most twice that kept, the newest lines in order
    assert log.stat().st_size <= 16 << 10
    assert log.with_name("output.log.1").stat().st_size <= 16 << 10
    assert len(out) <= 32 << 10
    lines = [line for line in out.splitlines() if line.startswith(b"line-")]
    numbers = [int(line.split(b"-")[1]) for line in lines[1:]]
    assert numbers == list(range(numbers[0], 1000)), numbers[:5]
    assert numbers[0] > 600, numbers[0]
    hyperctl(*a, "rm", "-f", "job")
    assert json.loads(hyperctl(*a, "ps", "-a", "--format", "json").stdout) == []


def test_the_api_bounds_captured_output_and_processes(
        hyperctl: Hyperctl, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    monkeypatch.setenv("RUNV_TENANT", "ci")
    with Sandbox.create("busybox", pids_limit=8, max_output=1000) as box:
        result = box.run(["sh", "-c", "yes y 2>/dev/null | head -c 100000; echo done >&2"])
        assert result.truncated and result.stdout == b"y\n" * 500, len(result.stdout)
        assert result.stderr == b"done\n" and result.exit_code == 0
        whole = box.run(["sh", "-c", "yes y 2>/dev/null | head -c 100000"], max_output=1 << 20)
        assert not whole.truncated and len(whole.stdout) == 100000
        box.write_file("/big", b"x" * 5000)
        with pytest.raises(CommandFailed, match="larger than 1000 bytes"):
            box.read_file("/big")
        assert box.read_file("/big", max_bytes=5000) == b"x" * 5000
        _forks_stopped(box.run(["sh", "-c", FORKS]).stdout)
        rows = json.loads(hyperctl("--tenant", "ci", "ps", "--format", "json").stdout)
        assert [r["id"] for r in rows] == [box.id]
        assert json.loads(hyperctl("ps", "--format", "json").stdout) == []
