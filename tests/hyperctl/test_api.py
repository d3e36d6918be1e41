"""The Python API as a CI system uses it: one sandbox per job, jobs in parallel, each job's
files invisible to the others, everything removed afterwards; and the sync API's calls."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py.api import AsyncSandbox, CommandFailed, CommandTimeout, Output, Sandbox
from runv_py.errors import InvalidState
from tests.hyperctl.conftest import Hyperctl

pytestmark = pytest.mark.vm


@pytest.fixture
def roots(hyperctl: Hyperctl, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hyperctl]:
    """The API in this process, with the CLI fixture's roots and runtime config."""
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    yield hyperctl


async def _job(number: int, seen: dict[int, str]) -> int:
    async with await AsyncSandbox.create("busybox", memory="64m", cpus=1,
                                         env={"JOB": str(number)}, timeout=600) as box:
        await box.write_file("/work/secret.txt", f"job {number}\n".encode())
        listing = await box.run(["sh", "-c", "cat /work/*.txt; echo JOB=$JOB"], check=True)
        seen[number] = listing.stdout.decode()
        proc = await box.start(["sh", "-c", f"echo out{number}; echo err{number} >&2; "
                                f"exit {number}"])
        chunks = [chunk async for chunk in proc]
        assert sorted((c.stream, c.data) for c in chunks) == [
            ("stderr", f"err{number}\n".encode()), ("stdout", f"out{number}\n".encode())]
        return await proc.wait()


def test_four_parallel_ci_jobs_are_isolated(roots: Hyperctl) -> None:
    seen: dict[int, str] = {}

    async def main() -> list[int]:
        return await asyncio.gather(*(_job(n, seen) for n in range(4)))

    assert asyncio.run(main()) == [0, 1, 2, 3]
    assert seen == {n: f"job {n}\nJOB={n}\n" for n in range(4)}
    assert roots("ps", "-a", "-q").stdout == b""
    assert roots.leftovers() == []


def test_sync_sandbox(roots: Hyperctl, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("alpha\n")
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho script ran\n")
    script.chmod(0o755)
    with Sandbox.create("busybox") as box:
        names = roots("ps", "--format", "json").stdout.decode()
        assert box.name in names
        result = box.run(["sh", "-c", "echo out; echo err >&2; exit 4"])
        assert (result.exit_code, result.stdout, result.stderr) == (4, b"out\n", b"err\n")
        assert not result.ok
        assert box.run("tr a-z A-Z", input=b"shout").stdout == b"SHOUT"
        assert box.run("pwd", workdir="/tmp", env={"X": "1"}).stdout == b"/tmp\n"
        process = box.start(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done"])
        chunks = list(process)
        assert process.wait() == 0
        assert b"".join(c.data for c in chunks) == b"1\n2\n3\n"
        assert all(isinstance(c, Output) and c.stream == "stdout" for c in chunks)
        with pytest.raises(CommandTimeout, match="still running after 1s"):
            box.run(["sleep", "60"], timeout=1)
        with pytest.raises(CommandFailed, match="exit status 1") as failed:
            box.read_file("/no/such/file")
        assert b"No such file" in failed.value.result.stderr
        box.copy_in(src, "/work/src")
        box.copy_in(script, "/usr/local/bin/job")
        assert box.run("job").stdout == b"script ran\n"
        box.run(["sh", "-c", "echo beta > /work/src/sub/b.txt"], check=True)
        box.copy_out("/work/src", tmp_path / "back")
        assert (tmp_path / "back" / "sub" / "b.txt").read_text() == "beta\n"
        assert (tmp_path / "back" / "sub" / "a.txt").read_text() == "alpha\n"
        box.copy_out("/work/src/sub/a.txt", tmp_path / "one.txt")
        assert (tmp_path / "one.txt").read_text() == "alpha\n"
    assert roots("ps", "-a", "-q").stdout == b""
    assert roots.leftovers() == []


OWNER = """
import sys, time
from runv_py.api import Sandbox
box = Sandbox.create("busybox")
print(box.id, flush=True)
time.sleep(600)
"""


def _gone(hc: Hyperctl, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while hc("ps", "-a", "-q").stdout or hc.leftovers():
        assert time.monotonic() < deadline, (hc("ps", "-a").stdout, hc.leftovers())
        time.sleep(0.5)


def test_sandbox_ends_with_the_program_that_made_it(roots: Hyperctl) -> None:
    proc = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    sandbox_id = proc.stdout.readline().decode().strip()
    try:
        assert len(sandbox_id) == 32, sandbox_id
        assert roots("ps", "-q").stdout.decode().split() == [sandbox_id[:12]]
    finally:
        proc.kill()
        proc.wait()
    _gone(roots)


def test_sandbox_timeout(roots: Hyperctl) -> None:
    with Sandbox.create("busybox", timeout=3) as box:
        deadline = time.monotonic() + 60
        with pytest.raises(InvalidState, match="has ended"):
            while time.monotonic() < deadline:
                box.run("true")
                time.sleep(0.5)
    _gone(roots)


def _mem_total_mib(box: Sandbox) -> int:
    meminfo = box.run(["head", "-1", "/proc/meminfo"], check=True).stdout.split()
    return int(meminfo[1]) // 1024


def test_a_sandbox_is_resized_through_the_api_and_hyperctl(roots: Hyperctl) -> None:
    """Sandbox.update and `hyperctl update` grow the running sandbox's VM for new limits and
    give the memory back (docs/resize.md); beyond the maximum, nothing changes."""
    with Sandbox.create("busybox", timeout=600) as box:
        before = _mem_total_mib(box)
        box.update(memory="256m", cpus=2)
        assert _mem_total_mib(box) == before + 256
        assert box.run(["cat", "/sys/devices/system/cpu/online"], check=True).stdout == b"0-1\n"
        refused = roots("update", "--memory", "64g", box.name, check=False)
        assert refused.returncode == 1 and b"max_memory_mib" in refused.stderr
        assert _mem_total_mib(box) == before + 256
        assert roots("update", "--memory", "-1", box.name).stdout.decode().strip() == box.name
        assert _mem_total_mib(box) == before
