"""The OCI runtime-tools validation suite (the public conformance test of OCI runtimes) against
runv and against runc 1.1.5, in the same run on the same machine. It fails when a program that
runc passes fails under runv, unless docs/runv.md names that program, with its reason, as one
no VM runtime can pass, or as one whose verdict the suite leaves to a race under any runtime.
Every program's result for both runtimes is printed as a table."""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.cli.conftest import RUNV, Runv, runv, subreaper  # noqa: F401  (fixtures)

from .runtime_tools import Verdict, programs, run

TOP = Path(__file__).resolve().parents[2]
PROGRAM_TIMEOUT_S = 900.0
RUNV_PARALLEL = 2
# They make and remove the same cgroups (/cgrouptest) under either runtime: never both at once.
CGROUP_PROGRAMS = re.compile(r"^(linux_cgroups_.*|delete_resources|delete_only_create_resources)$")
VM_HEADING = "### runtime-tools programs no VM runtime can pass"
RACE_HEADING = "### runtime-tools programs decided by a race"


def listed(heading: str) -> dict[str, str]:
    """The programs docs/runv.md lists under HEADING, with the reason."""
    text = (TOP / "docs" / "runv.md").read_text()
    if heading not in text:
        pytest.fail(f"docs/runv.md has no section {heading!r}")
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^- `([a-z0-9_]+)`: (.+)$", section, re.MULTILINE))


def _wrapper(path: Path, argv: list[str]) -> Path:
    """RUNTIME for the programs: the runtime with our state root (they pass no --root)."""
    path.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in argv) + ' "$@"\n')
    path.chmod(0o755)
    return path


def _table(names: list[str], runc: dict[str, Verdict], ours: dict[str, Verdict]) -> str:
    lines = [f"{'program':<34}{'runc':<6}{'runv':<6}{'runv s':>7}  why runv failed"]
    for name in names:
        a, b = runc[name], ours[name]
        lines.append(f"{name:<34}{'pass' if a.passed else 'FAIL':<6}"
                     f"{'pass' if b.passed else 'FAIL':<6}{b.seconds:>7.1f}  {b.why[:90]}")
    passed = (sum(v.passed for v in runc.values()), sum(v.passed for v in ours.values()))
    lines.append(f"passed: runc {passed[0]} of {len(names)}, runv {passed[1]} of {len(names)}; "
                 f"runv took {sum(v.seconds for v in ours.values()):.0f} s")
    return "\n".join(lines)


@pytest.mark.timeout(4 * 3600)
def test_runtime_tools_runv_against_runc(runv: Runv, assets_dir: Path,  # noqa: F811
                                         tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    suite = assets_dir / "runtime-tools"
    if not (suite / "validation").is_dir():
        pytest.fail(f"the runtime-tools suite is not built in {suite}: run `make assets`")
    # Not compared: a VM cannot pass them, or a pass under runc is a won race.
    exceptions = listed(VM_HEADING) | listed(RACE_HEADING)
    names = programs(suite)
    assert len(names) == 58, names
    assert set(exceptions) <= set(names), set(exceptions) - set(names)
    runv_rt = _wrapper(tmp_path / "runv-rt", [RUNV, "--root", str(runv.root), "--log",
                                              str(tmp_path / "runv.log")])
    runc_root = tmp_path / "runc-root"
    runc_rt = _wrapper(tmp_path / "runc-rt", [shutil.which("runc") or "runc", "--root",
                                              str(runc_root)])
    runc: dict[str, Verdict] = {}
    ran_runv: dict[str, Verdict] = {}
    bundles = Path(tempfile.mkdtemp(prefix="runv-rt-", dir="/var/tmp"))  # reachable by all
    bundles.chmod(0o755)

    def run_runc() -> None:
        for name in names:
            runc[name] = run(suite, name, runc_rt, runv.env, workdir=tmp_path / "runc",
                             bundles=bundles / "runc", timeout_s=PROGRAM_TIMEOUT_S)

    def run_runv(name: str) -> None:
        ran_runv[name] = run(suite, name, runv_rt, runv.env, workdir=tmp_path / "runv",
                             bundles=bundles / "runv", timeout_s=PROGRAM_TIMEOUT_S)

    runc_thread = threading.Thread(target=run_runc, name="runc")
    t0 = time.monotonic()
    runc_thread.start()
    try:
        # Most of a runv program's time is waiting (for a VM, for the program's own sleeps):
        # two at a time, except those that share /cgrouptest, one by one once runc is done.
        with concurrent.futures.ThreadPoolExecutor(RUNV_PARALLEL) as pool:
            list(pool.map(run_runv, [n for n in names if not CGROUP_PROGRAMS.match(n)]))
        runc_thread.join()
        for name in names:
            if CGROUP_PROGRAMS.match(name):
                run_runv(name)
    finally:
        runc_thread.join()
        shutil.rmtree(bundles, ignore_errors=True)
    elapsed = time.monotonic() - t0
    table = _table(names, runc, ran_runv)
    with capsys.disabled():
        print(f"\nOCI runtime-tools validation ({elapsed:.0f} s in all):\n{table}\n"
              f"outputs in {tmp_path}")
    # What the programs left (a failed one may not delete its container) goes before the
    # fixture checks that nothing is left.
    for leftover in runv("list", "-q").stdout.decode().split():
        runv("delete", "--force", leftover, check=False)
    regressions = [f"{name}: {ran_runv[name].why}" for name in names
                   if runc[name].passed and not ran_runv[name].passed
                   and name not in exceptions]
    assert not regressions, ("programs runc passes that fail under runv (docs/runv.md "
                             "lists those not compared):\n" +
                             "\n".join(regressions) + "\n" + table)
