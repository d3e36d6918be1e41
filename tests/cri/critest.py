"""Running critest (the CRI validation suite of cri-tools) and reading its JUnit report."""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

# Specs that need the host's namespaces or mount propagation back to the host: a VM cannot
# give them, and runv refuses them at create with an error that says so.
HOST_NAMESPACE_SPECS = (
    "runtime should support HostPID",
    "runtime should support HostIpc is true",
    "runtime should support HostNetwork is true",
    "runtime should support portforward in host network",
    "mount with 'rshared' should support propagation from host to container and vice versa",
)
REFUSAL = "a VM cannot share"


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    status: str    # passed, failed, skipped, ...
    message: str   # the failure's first lines, if any

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True, slots=True)
class Run:
    handler: str
    results: dict[str, Result]
    seconds: float
    log: Path

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results.values())


def short_name(testcase_name: str) -> str:
    """ "[It] [sig-node] Container runtime should ... [Conformance]" -> the spec's own words
    after the last container description ("runtime should ..." as critest prints it)."""
    name = testcase_name.removeprefix("[It] ").removeprefix("[sig-node] ")
    return " ".join(name.split())


def spec_title(name: str) -> str:
    """The It() text of a spec, for matching against HOST_NAMESPACE_SPECS."""
    for title in HOST_NAMESPACE_SPECS:
        if name.endswith(title):
            return title
    return name


def parse_report(report: Path) -> dict[str, Result]:
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        status = case.get("status", "")
        if not name.startswith("[It]") or status == "skipped":
            continue  # [BeforeSuite], [ReportAfterSuite]; the benchmarks critest skips
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        message = ""
        if problem is not None:
            message = (problem.get("message") or problem.text or "").strip()
        results[short_name(name)] = Result(short_name(name), status, message)
    return results


def run(critest: Path, endpoint: str, handler: str, out: Path, *,
        timeout_s: float = 3600, extra: tuple[str, ...] = ()) -> Run:
    report = out / f"critest-{handler}.xml"
    log = out / f"critest-{handler}.log"
    argv = [str(critest), f"--runtime-endpoint={endpoint}", f"--image-endpoint={endpoint}",
            f"--runtime-handler={handler}", f"--ginkgo.junit-report={report}",
            "--ginkgo.no-color", f"--ginkgo.timeout={int(timeout_s)}s", *extra]
    start = time.monotonic()
    with open(log, "wb") as output:
        subprocess.run(argv, cwd=out, stdout=output, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=timeout_s + 120, check=False)
    seconds = time.monotonic() - start
    if not report.exists():
        raise AssertionError(f"critest ({handler}) wrote no report; its log ends with:\n"
                             + log.read_text(errors="replace")[-3000:])
    return Run(handler, parse_report(report), seconds, log)


def table(runs: list[Run]) -> str:
    """One line per spec: each handler's outcome, then the spec."""
    names = sorted({name for r in runs for name in r.results})
    width = max(len("failed"), *(len(r.handler) for r in runs)) + 2
    head = "".join(r.handler.ljust(width) for r in runs) + "spec"
    lines = [head]
    for name in names:
        cells = []
        for r in runs:
            result = r.results.get(name)
            cells.append(("-" if result is None else
                          "ok" if result.passed else result.status).ljust(width))
        lines.append("".join(cells) + name)
    totals = ", ".join(f"{r.handler} {r.passed}/{len(r.results)} in {r.seconds:.0f} s"
                       for r in runs)
    return "\n".join([*lines, f"passed: {totals}"])
