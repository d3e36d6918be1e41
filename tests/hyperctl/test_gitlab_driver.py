"""The GitLab Runner custom executor driver (contrib/gitlab-runner) driven the way gitlab-runner
drives it: its executable with the stage as the argument, the job in CUSTOM_ENV_* variables,
the failure codes in BUILD_FAILURE_EXIT_CODE / SYSTEM_FAILURE_EXIT_CODE, run_exec given the
stage's script and name. Real VMs; after cleanup nothing of a job is left (also of one whose
prepare was stopped half-way, as gitlab-runner's prepare_exec_timeout does)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.hyperctl.conftest import HYPERCTL, Hyperctl

pytestmark = pytest.mark.vm

DRIVER = Path(__file__).parents[2] / "contrib" / "gitlab-runner" / "runv_gitlab_driver.py"
BUILD_FAILURE, SYSTEM_FAILURE = 37, 38   # not gitlab-runner's 1 and 2: the driver must read them


class Runner:
    """What gitlab-runner does for one job: the environment and arguments of every stage."""

    def __init__(self, hyperctl: Hyperctl, tmp: Path, config: Path, job_id: str, *,
                 project: str, image: str = "") -> None:
        self.tmp = tmp / f"runner-{job_id}"
        self.tmp.mkdir()
        namespace = project.rpartition("/")[0]
        self.env = dict(hyperctl.env, TMPDIR=str(self.tmp),
                        BUILD_FAILURE_EXIT_CODE=str(BUILD_FAILURE),
                        SYSTEM_FAILURE_EXIT_CODE=str(SYSTEM_FAILURE),
                        CUSTOM_ENV_CI_JOB_ID=job_id, CUSTOM_ENV_CI_PROJECT_PATH=project,
                        CUSTOM_ENV_CI_PROJECT_NAMESPACE=namespace,
                        CUSTOM_ENV_CI_JOB_IMAGE=image, CUSTOM_ENV_CI_JOB_TIMEOUT="3600",
                        CUSTOM_ENV_CI_BUILDS_DIR="/builds")
        self.config = config
        self.scripts = 0

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """A stage in a process group of its own, which gitlab-runner signals as a whole."""
        return subprocess.Popen([str(DRIVER), "--config", str(self.config), *args],
                                cwd=self.tmp, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

    def stage(self, *args: str) -> tuple[int, str]:
        child = self.popen(*args)
        out, err = child.communicate(timeout=300)
        return child.returncode, (out + err).decode(errors="replace")

    def run(self, name: str, script: str) -> tuple[int, str]:
        self.scripts += 1
        path = self.tmp / f"script{self.scripts}"
        path.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + script)
        return self.stage("run", str(path), name)


def _driver_config(tmp: Path) -> Path:
    config = tmp / "driver.toml"
    config.write_text(f'''
hyperctl = ["{HYPERCTL}"]
work_dir = "{tmp / 'ci'}"
max_starting = 3
[tenant_map]
"beta-org" = "gl-beta"
[defaults]
network = "none"
memory = "256m"
cpus = 1
pids_limit = 256
[tenants.gl-beta]
images = ["busybox*"]
''')
    return config


def _host_cgroups(tenant: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/hyperctl/{tenant}/*") if p.is_dir()]


def test_a_job_through_the_four_stages_and_nothing_left(hyperctl: Hyperctl,
                                                         tmp_path: Path) -> None:
    config = _driver_config(tmp_path)
    acme = Runner(hyperctl, tmp_path, config, "4242", project="GL-Acme/backend/app")
    beta = Runner(hyperctl, tmp_path, config, "4243", project="beta-org/tools/lint",
                  image="busybox")
    stopped = Runner(hyperctl, tmp_path, config, "4244", project="GL-Acme/backend/app")

    # config_exec: JSON on stdout
    code, out = acme.stage("config")
    assert code == 0, out
    answer = json.loads(out)
    assert (answer["builds_dir"], answer["cache_dir"], answer["builds_dir_is_shared"]) == (
        "/builds", "/cache", False), answer
    assert answer["driver"]["name"] == "runv-py" and answer["hostname"] == "gl-4242"

    # A tenant may not use an image outside its list: a build failure, nothing started
    refused = Runner(hyperctl, tmp_path, config, "4245", project="beta-org/x",
                     image="python:3.12")
    code, out = refused.stage("prepare")
    assert code == BUILD_FAILURE and "not one tenant 'gl-beta' may use" in out, (code, out)

    # prepare_exec of three jobs at once; the third is killed half-way (gitlab-runner's
    # prepare_exec_timeout: SIGTERM, then SIGKILL to the group), its cleanup_exec still runs
    results: dict[str, tuple[int, str]] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(
        r.env["CUSTOM_ENV_CI_JOB_ID"], r.stage("prepare"))) for r in (acme, beta)]
    for thread in threads:
        thread.start()
    half_way = stopped.popen("prepare")
    containers = hyperctl.data / "tenants" / "gl-acme" / "containers"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            containers.is_dir() and len(os.listdir(containers)) >= 2):
        time.sleep(0.05)
    os.killpg(half_way.pid, signal.SIGKILL)    # no chance to undo anything itself
    assert half_way.wait(120) == -signal.SIGKILL
    for thread in threads:
        thread.join(300)
    assert results["4242"][0] == 0 and results["4243"][0] == 0, results
    assert "tenant gl-acme" in results["4242"][1] and "tenant gl-beta" in results["4243"][1]

    # run_exec per stage: the script writes into the workspace and the tenant's cache
    code, out = acme.run("get_sources", "mkdir -p /builds/acme/app && cd /builds/acme/app\n"
                         "echo built > out.txt\necho acme-cache > /cache/acme-was-here\n"
                         "echo first-line-of-output\n")
    assert code == 0 and "first-line-of-output" in out, (code, out)
    workspace = tmp_path / "ci" / "gl-acme" / "builds" / "4242"
    assert (workspace / "acme" / "app" / "out.txt").read_text() == "built\n"
    assert (tmp_path / "ci" / "gl-acme" / "cache" / "acme-was-here").exists()

    # another tenant's job sees neither the workspace nor the cache
    code, out = beta.run("build_script", "ls -A /cache /builds; cat /builds/acme/app/out.txt "
                         "2>&1 || echo no-acme-workspace\n")
    assert code == 0 and "acme-was-here" not in out and "no-acme-workspace" in out, out

    # a failing stage: the build-failure code, the script's own status in the exit code file
    acme.env["BUILD_EXIT_CODE_FILE"] = str(acme.tmp / "exit-code")
    code, out = acme.run("step_script", "echo before-failing\nexit 3\n")
    assert code == BUILD_FAILURE and "before-failing" in out, (code, out)
    assert (acme.tmp / "exit-code").read_text().strip() == "3"
    code, out = acme.run("after_script", "cat /builds/acme/app/out.txt\n")
    assert code == 0 and "built" in out, out

    # cleanup_exec: every job's VM, records, workspace and host cgroup gone; again is fine
    for runner in (acme, beta, stopped, refused):
        code, out = runner.stage("cleanup")
        assert code == 0, out
        assert runner.stage("cleanup")[0] == 0
    assert not workspace.exists() and not (tmp_path / "ci/gl-acme/builds/4244").exists()
    assert (tmp_path / "ci" / "gl-acme" / "cache" / "acme-was-here").exists()  # caches persist
    for tenant in ("gl-acme", "gl-beta"):
        listed = hyperctl("--tenant", tenant, "ps", "-a", "--format", "json").stdout
        assert json.loads(listed) == [], listed
        assert not _host_cgroups(tenant), _host_cgroups(tenant)
    assert not hyperctl.leftovers(), hyperctl.leftovers()

    # a stage run after its VM is gone is the runner's failure, not the build's
    code, out = acme.run("step_script", "true\n")
    assert code == SYSTEM_FAILURE and "VM cannot run the stage" in out, (code, out)
