"""bench/ci: CI jobs of several tenants at once on one host, each in its own VM, through the
GitLab Runner driver (contrib/gitlab-runner) the way gitlab-runner calls it, with the default
runtime config (a throwaway hyperctl root and data root).

Three parts, in one run:
- alone: one job by itself, the baseline;
- fair: TENANTS x --per-tenant jobs submitted together, each the same CPU work;
- hog: the same, but one job of the last tenant busy-loops instead, until the others are done.

Per job: the time from "submitted" (prepare called) to the first line of its output and to the
end of its work (wall time); the PSS of its host processes while idle; what it can see of the
others (their workspaces, another tenant's cache, their addresses by ping). Printed: each
tenant's p50/p95 wall time in fair and hog, their ratios to fair and to alone, and the hog's
CPU use from its host cgroup.

    python bench/ci.py [--per-tenant 5] [--work 200000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "contrib" / "gitlab-runner" / "runv_gitlab_driver.py"
HYPERCTL = str(Path(sys.executable).parent / "hyperctl")
TENANTS = ("bench-ci-a", "bench-ci-b", "bench-ci-c", "bench-ci-d")
HOG = TENANTS[-1]
CGROUP_ROOT = Path("/sys/fs/cgroup")

WORK = """echo "first-line $JOB"
echo "secret-$JOB" > /builds/secret
echo "$JOB" > "/cache/marker-$JOB"
ip -4 -o addr show eth0 | awk '{{print $4}}' | cut -d/ -f1 > /builds/ip
i=0; while [ $i -lt {n} ]; do i=$((i+1)); done
echo "cache: $(ls /cache | tr '\\n' ' ')"
echo "builds: $(ls /builds | tr '\\n' ' ')"
"""
HOG_WORK = 'echo "first-line $JOB"\nwhile :; do :; done\n'
# The control (ping works at all) gets longer: 20 TCG guests on 2 CPUs answer slowly.
PING = """for ip in {others}; do (ping -c 1 -W 3 $ip >/dev/null 2>&1 && echo "reached $ip") & done
wait
ping -c 1 -W 20 127.0.0.1 >/dev/null 2>&1 && echo ping-works
"""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


@dataclass
class Job:
    """One CI job, its stages called as gitlab-runner calls the driver."""

    top: Path
    config: Path
    job_id: str
    tenant: str
    hog: bool = False
    submitted: float = 0.0
    first_line_s: float | None = None
    wall_s: float | None = None
    failures: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    pss_kib: int | None = None

    def env(self) -> dict[str, str]:
        return dict(os.environ, BUILD_FAILURE_EXIT_CODE="1", SYSTEM_FAILURE_EXIT_CODE="2",
                    CUSTOM_ENV_CI_JOB_ID=self.job_id,
                    CUSTOM_ENV_CI_PROJECT_NAMESPACE=f"{self.tenant}/group",
                    CUSTOM_ENV_CI_PROJECT_PATH=f"{self.tenant}/group/project",
                    CUSTOM_ENV_CI_JOB_TIMEOUT="3600")

    def stage(self, *args: str, first_line: bool = False) -> tuple[int, str]:
        child = subprocess.Popen([str(DRIVER), "--config", str(self.config), *args],
                                 env=self.env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            if first_line and self.first_line_s is None and line.startswith(b"first-line"):
                self.first_line_s = time.monotonic() - self.submitted
            lines.append(line.decode(errors="replace"))
        return child.wait(), "".join(lines)

    def script(self, name: str, text: str) -> tuple[int, str]:
        path = self.top / f"script-{self.job_id}-{name}"
        path.write_text(f"JOB={self.job_id}\n{text}")
        return self.stage("run", str(path), name, first_line=name == "step_script")

    def work(self, n: int) -> None:
        """prepare, then the job's work; wall_s from submitted to its end."""
        self.submitted = time.monotonic()
        code, out = self.stage("prepare")
        if code != 0:
            self.failures.append(f"prepare: {out.strip()[-300:]}")
            return
        code, out = self.script("step_script", HOG_WORK if self.hog else WORK.format(n=n))
        if self.hog:
            return   # ended by cleanup
        self.wall_s = time.monotonic() - self.submitted
        if code != 0:
            self.failures.append(f"step_script exited {code}: {out.strip()[-300:]}")
        for line in out.splitlines():
            if line.startswith(("cache:", "builds:")):
                self.seen.append(line)

    def cleanup(self) -> None:
        code, out = self.stage("cleanup")
        if code != 0:
            self.failures.append(f"cleanup: {out.strip()[-300:]}")


class Bench:
    def __init__(self, top: Path) -> None:
        self.top = top
        self.env = dict(os.environ, HYPERCTL_ROOT=str(top / "hc-root"),
                        HYPERCTL_DATA_ROOT=str(top / "hc-data"))
        os.environ.update(HYPERCTL_ROOT=self.env["HYPERCTL_ROOT"],
                          HYPERCTL_DATA_ROOT=self.env["HYPERCTL_DATA_ROOT"])
        self.rounds = 0

    def sweep(self) -> None:
        """Remove what a failed part left (the driver's cleanup removed the rest)."""
        for tenant in TENANTS:
            listed = subprocess.run([HYPERCTL, "--tenant", tenant, "ps", "-aq"], env=self.env,
                                    capture_output=True, check=False).stdout.split()
            for cid in listed:
                subprocess.run([HYPERCTL, "--tenant", tenant, "rm", "-f", cid.decode()],
                               env=self.env, capture_output=True, check=False)

    def driver_config(self) -> Path:
        self.rounds += 1
        path = self.top / f"driver-{self.rounds}.toml"
        work_dir = self.top / f"ci-{self.rounds}"
        path.write_text(f'hyperctl = ["{HYPERCTL}"]\nwork_dir = "{work_dir}"\n'
                        '[defaults]\nmemory = "512m"\n')
        return path

    def container(self, job: Job) -> dict[str, Any]:
        done = subprocess.run([HYPERCTL, "--tenant", job.tenant, "inspect", f"gl-{job.job_id}"],
                              env=self.env, capture_output=True, check=True)
        found: dict[str, Any] = json.loads(done.stdout)[0]
        return found

    def host_pids(self, job: Job) -> set[int]:
        """The job's host processes: its host cgroup's, and those naming its container."""
        cid = self.container(job)["id"]
        pids: set[int] = set()
        for procs in CGROUP_ROOT.glob(f"*/hyperctl/{job.tenant}/{cid[:16]}/cgroup.procs"):
            pids |= {int(p) for p in procs.read_text().split()}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if cid.encode() in (entry / "cmdline").read_bytes():
                        pids.add(int(entry.name))
                except OSError:
                    continue
        return pids

    def pss_kib(self, job: Job) -> int:
        total = 0
        for pid in self.host_pids(job):
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total

    def cpu_usage_s(self, job: Job) -> float:
        cid = self.container(job)["id"]
        usage = CGROUP_ROOT / "cpuacct" / "hyperctl" / job.tenant / cid[:16] / "cpuacct.usage"
        return int(usage.read_text()) / 1e9

    def isolation(self, jobs: list[Job], work_dir: Path) -> list[str]:
        """What a job saw of another: workspace files, another tenant's cache markers, a
        reply to ping."""
        problems = []
        tenant_of = {j.job_id: j.tenant for j in jobs}
        ips = {}
        for job in jobs:
            ip_file = work_dir / job.tenant / "builds" / job.job_id / "ip"
            if ip_file.exists() and ip_file.read_text().strip():
                ips[job.job_id] = ip_file.read_text().strip()
        for job in jobs:
            for line in job.seen:
                names = line.split(":", 1)[1].split()
                if line.startswith("builds:") and sorted(names) != ["ip", "secret"]:
                    problems.append(f"{job.job_id} saw in /builds: {names}")
                if line.startswith("cache:"):
                    others = [n for n in names if tenant_of.get(n.removeprefix("marker-"))
                              != job.tenant]
                    if others:
                        problems.append(f"{job.job_id} saw another tenant's cache: {others}")
        pingers = [j for j in jobs if not j.hog and not j.failures and j.job_id in ips]
        results: dict[str, str] = {}

        def ping(job: Job) -> None:
            others = " ".join(ip for jid, ip in ips.items() if jid != job.job_id)
            code, out = job.script("network", PING.format(others=others))
            results[job.job_id] = f"{out}(exit {code})"

        threads = [threading.Thread(target=ping, args=(j,)) for j in pingers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for jid, out in results.items():
            if "ping-works" not in out:
                problems.append(f"{jid}: ping does not work at all: {out[-200:]}")
            problems += [f"{jid} {line}" for line in out.splitlines()
                         if line.startswith("reached")]
        if len(ips) < len([j for j in jobs if not j.failures]) - 1:
            problems.append(f"only {len(ips)} jobs reported an address")
        return problems

    def round(self, per_tenant: int, n: int, *, hog: bool) -> dict[str, Any]:
        config = self.driver_config()
        work_dir = self.top / f"ci-{self.rounds}"
        jobs = [Job(self.top, config, f"{self.rounds}{t}{i:02d}", tenant,
                    hog=hog and tenant == HOG and i == per_tenant - 1)
                for t, tenant in enumerate(TENANTS) for i in range(per_tenant)]
        hog_job = next((j for j in jobs if j.hog), None)
        threads = {j.job_id: threading.Thread(target=j.work, args=(n,)) for j in jobs}
        started = time.monotonic()
        for thread in threads.values():
            thread.start()
        hog_cpu: dict[str, float] = {}
        if hog_job is not None:
            while hog_job.first_line_s is None and threads[hog_job.job_id].is_alive():
                time.sleep(0.2)
            hog_cpu["start"] = self.cpu_usage_s(hog_job)
            hog_cpu["at"] = time.monotonic()
        for job in jobs:
            if not job.hog:
                threads[job.job_id].join()
        result: dict[str, Any] = {}
        if hog_job is not None and hog_job.first_line_s is not None:
            used = self.cpu_usage_s(hog_job) - hog_cpu["start"]
            result["hog_cpus_used"] = round(used / (time.monotonic() - hog_cpu["at"]), 3)
        result["all_work_done_s"] = round(time.monotonic() - started, 1)
        idle = [j for j in jobs if not j.hog and not j.failures]
        pss = [self.pss_kib(j) for j in idle]
        result["idle_job_pss_mib"] = {"p50": round(statistics.median(pss) / 1024, 1),
                                      "max": round(max(pss) / 1024, 1)} if pss else None
        result["isolation_problems"] = self.isolation(jobs, work_dir)
        for job in jobs:
            job.cleanup()
        if hog_job is not None:
            threads[hog_job.job_id].join()
        result["finished"] = f"{sum(1 for j in jobs if j.wall_s and not j.failures)} of " \
                             f"{sum(1 for j in jobs if not j.hog)}"
        result["failures"] = {j.job_id: j.failures for j in jobs if j.failures}
        result["tenants"] = {}
        for tenant in TENANTS:
            walls = [j.wall_s for j in jobs if j.tenant == tenant and j.wall_s is not None]
            firsts = [j.first_line_s for j in jobs if j.tenant == tenant and
                      j.first_line_s is not None]
            works = [j.wall_s - j.first_line_s for j in jobs if j.tenant == tenant and
                     j.wall_s is not None and j.first_line_s is not None]
            result["tenants"][tenant] = {
                "jobs": len(walls), "wall_p50_s": percentile(walls, 0.5) if walls else None,
                "wall_p95_s": percentile(walls, 0.95) if walls else None,
                "work_p50_s": percentile(works, 0.5) if works else None,
                "work_p95_s": percentile(works, 0.95) if works else None,
                "first_line_p50_s": percentile(firsts, 0.5) if firsts else None,
                "first_line_p95_s": percentile(firsts, 0.95) if firsts else None}
        every = [j.first_line_s for j in jobs if j.first_line_s is not None]
        result["first_line_p50_s"] = percentile(every, 0.5) if every else None
        result["first_line_p95_s"] = percentile(every, 0.95) if every else None
        return result

    def alone(self, n: int) -> dict[str, Any]:
        config = self.driver_config()
        job = Job(self.top, config, f"{self.rounds}00", TENANTS[0])
        job.work(n)
        pss = self.pss_kib(job) if not job.failures else None
        job.cleanup()
        if job.failures or job.wall_s is None or job.first_line_s is None:
            raise RuntimeError(f"the job alone failed: {job.failures}")
        return {"wall_s": round(job.wall_s, 3), "first_line_s": round(job.first_line_s, 3),
                "work_s": round(job.wall_s - job.first_line_s, 3),
                "idle_job_pss_mib": round((pss or 0) / 1024, 1)}


def ratios(alone: dict[str, Any], fair: dict[str, Any], hog: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tenant in TENANTS:
        f, h = fair["tenants"][tenant], hog["tenants"][tenant]
        if f["wall_p50_s"] and h["wall_p50_s"]:
            out[tenant] = {"fair_p50_over_alone": round(f["wall_p50_s"] / alone["wall_s"], 2),
                           "hog_p50_over_fair": round(h["wall_p50_s"] / f["wall_p50_s"], 2),
                           "hog_p95_over_fair": round(h["wall_p95_s"] / f["wall_p95_s"], 2),
                           "hog_work_p50_over_fair": round(h["work_p50_s"] / f["work_p50_s"], 2)}
    if hog.get("hog_cpus_used") is not None:
        # The others' CPU-bound work, left (host CPUs - the hog's) instead of all the host's,
        # takes at most this much longer.
        cpus = os.cpu_count() or 1
        out["hog_share_bound"] = round(cpus / max(cpus - hog["hog_cpus_used"], 0.01), 2)
    for name, part in (("fair", fair), ("hog", hog)):
        if part["first_line_p50_s"]:
            out[f"{name}_first_line_p50_over_alone"] = round(
                part["first_line_p50_s"] / alone["first_line_s"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-tenant", type=int, default=5)
    parser.add_argument("--work", type=int, default=200000,
                        help="iterations of the jobs' shell loop (the CPU work of a job)")
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-ci-"))
    bench = Bench(top)
    try:
        alone = bench.alone(args.work)
        fair = bench.round(args.per_tenant, args.work, hog=False)
        hog = bench.round(args.per_tenant, args.work, hog=True)
    finally:
        bench.sweep()
        shutil.rmtree(top, ignore_errors=True)
    result = {"host_cpus": os.cpu_count(), "jobs": len(TENANTS) * args.per_tenant,
              "alone": alone, "fair": fair, "hog": hog, "ratios": ratios(alone, fair, hog)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    problems = fair["isolation_problems"] + hog["isolation_problems"]
    unfinished = [r["finished"] for r in (fair, hog) if r["failures"]]
    return 1 if problems or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
