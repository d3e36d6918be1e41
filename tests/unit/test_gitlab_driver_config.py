"""The GitLab Runner driver's logic without VMs: its config (errors naming the key), the tenant a
job's namespace maps to, and the hyperctl run flags a tenant's quotas become."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest

CONTRIB = Path(__file__).parents[2] / "contrib" / "gitlab-runner"


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runv_gitlab_driver",
                                                  CONTRIB / "runv_gitlab_driver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


d = _driver()


def _env(namespace: str, **more: str) -> dict[str, str]:
    return {"CUSTOM_ENV_CI_JOB_ID": "7", "CUSTOM_ENV_CI_PROJECT_NAMESPACE": namespace,
            "CUSTOM_ENV_CI_PROJECT_PATH": f"{namespace}/p",
            **{f"CUSTOM_ENV_{k}": v for k, v in more.items()}}


def test_the_example_config_parses() -> None:
    import tomllib

    config = d.load_config(CONTRIB / "driver.toml.example")
    assert config.quotas("acme").memory == "2g" and config.quotas("other").memory == "1g"
    assert config == d.parse_config(tomllib.loads(
        (CONTRIB / "driver.toml.example").read_text()), "x")


@pytest.mark.parametrize(("raw", "message"), [
    ({"work_dri": "/x"}, "work_dri: not a setting"),
    ({"work_dir": "rel"}, "work_dir: must be an absolute path"),
    ({"builds_dir": "/"}, "builds_dir: must be an absolute path in the VM"),
    ({"tenant": "Acme!"}, "tenant: 'Acme!' is not a tenant name"),
    ({"tenant_from": "group"}, "tenant_from: must be root_namespace or namespace"),
    ({"tenant_map": {"a": "B B"}}, "tenant_map.a: 'B B' is not a tenant name"),
    ({"defaults": {"cpus": "two"}}, "defaults.cpus: must be a number"),
    ({"defaults": {"memroy": "1g"}}, "defaults.memroy: not a setting"),
    ({"tenants": {"acme": {"images": [1]}}}, "tenants.acme.images: must be a list of strings"),
    ({"tenants": {"ACME": {}}}, "tenants.ACME: not a tenant name"),
])
def test_a_bad_config_names_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(d.DriverError) as caught:
        d.parse_config(raw, "cfg.toml")
    assert f"driver config cfg.toml: {message}" in str(caught.value), caught.value


def test_a_missing_explicit_config_is_an_error_and_the_default_one_optional(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(d.DriverError, match="no such file"):
        d.load_config(tmp_path / "none.toml")
    monkeypatch.delenv(d.CONFIG_ENV, raising=False)
    monkeypatch.setattr(d, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert d.load_config(None) == d.DriverConfig()


def test_the_tenant_of_a_job() -> None:
    config = d.parse_config({"tenant_map": {"corp": "c", "corp/team-x": "x"}}, "t")
    assert d.job_from_env(config, _env("corp/team-x/sub")).tenant == "x"   # longest entry
    assert d.job_from_env(config, _env("Corp/other")).tenant == "c"
    assert d.job_from_env(config, _env("corpse")).tenant == "corpse"      # not a parent
    assert d.job_from_env(config, _env("Acme/backend")).tenant == "acme"
    assert d.job_from_env(config, _env("acme/backend", CI_PROJECT_ROOT_NAMESPACE="acme")
                          ).tenant == "acme"
    whole = d.parse_config({"tenant_from": "namespace"}, "t")
    assert d.job_from_env(whole, _env("acme/backend")).tenant.startswith("acme-backend-")
    # changed names keep a hash of the original: two namespaces never share a tenant
    assert d.tenant_name("a.b") != d.tenant_name("a-b") == "a-b"
    assert len(d.tenant_name("x" * 80)) <= 32
    fixed = d.parse_config({"tenant": "ci"}, "t")
    assert d.job_from_env(fixed, _env("anything")).tenant == "ci"
    with pytest.raises(d.DriverError, match="CUSTOM_ENV_CI_JOB_ID"):
        d.job_from_env(config, {"CUSTOM_ENV_CI_PROJECT_NAMESPACE": "a"})
    with pytest.raises(d.DriverError, match="cannot tell the job's tenant"):
        d.job_from_env(config, {"CUSTOM_ENV_CI_JOB_ID": "1"})


def test_a_tenants_quotas_become_hyperctl_run_flags() -> None:
    config = d.parse_config({"work_dir": "/w", "defaults": {"egress": "10.0.0.0/8"},
                             "tenants": {"acme": {"cpus": 0.5, "blkio_weight": 200,
                                                  "images": ["busybox*"]}}}, "t")
    job = d.job_from_env(config, _env("acme", CI_JOB_TIMEOUT="600"))
    args = d.run_arguments(config, job)
    flags = dict(itertools.pairwise(args))
    assert flags["--name"] == "gl-7" and flags["--cpus"] == "0.5"
    assert flags["--egress"] == "10.0.0.0/8" and flags["--blkio-weight"] == "200"
    assert flags["--timeout"] == f"{600 + d.TIMEOUT_GRACE_S}s"   # the job's own timeout
    assert "/w/acme/builds/7:/builds" in args and "/w/acme/cache:/cache" in args
    assert args[-4:] == ["busybox", *d.KEEPALIVE]
    # what the job names is never an option to hyperctl
    open_config = d.parse_config({}, "t")
    for image in ("--volume=/:/host", "-v/:/h", "a b", ""):
        job = d.Job(job_id="7", tenant="acme", image=image, project_path="", timeout_s=None)
        with pytest.raises(d.JobRefused, match="is not an image reference"):
            d.run_arguments(open_config, job)
    with pytest.raises(d.JobRefused, match=r"'python:3\.12' is not one tenant 'acme' may use"):
        d.run_arguments(config, d.job_from_env(config, _env("acme", CI_JOB_IMAGE="python:3.12")))


def test_the_config_stage_answers_json_and_failure_codes_come_from_the_environment(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setattr(d.signal, "signal", lambda *a: None)   # pytest's SIGTERM stays

    config = tmp_path / "c.toml"
    config.write_text('builds_dir = "/b"\n')
    env = {**_env("acme"), "SYSTEM_FAILURE_EXIT_CODE": "9", "BUILD_FAILURE_EXIT_CODE": "8"}
    assert d.main(["--config", str(config), "config"], env) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["builds_dir"] == "/b" and answer["builds_dir_is_shared"] is False
    config.write_text('builds_dir = 3\n')
    assert d.main(["--config", str(config), "prepare"], env) == 9
    assert "builds_dir: must be a string" in capsys.readouterr().err


def test_starting_slots_hold_back_boots_past_max_starting(tmp_path: Path) -> None:
    import threading
    import time

    config = d.parse_config({"work_dir": str(tmp_path), "max_starting": 1}, "t")
    entered = []

    def second() -> None:
        with d.starting_slot(config):
            entered.append(time.monotonic())

    with d.starting_slot(config):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert not entered             # the one slot is held
        released = time.monotonic()
    thread.join(5)
    assert entered and entered[0] >= released
    with pytest.raises(d.DriverError, match="max_starting: must be a number"):
        d.parse_config({"max_starting": -1}, "t")


def test_the_error_line_of_hyperctl_not_the_console_tail() -> None:
    err = ("hyperctl: error: the agent did not answer in 60 s (raise [hypervisor] "
           "boot_timeout_s); guest console:\n[ 3.8] PCI: Fatal: No config space access\n")
    assert d._error_line(err).startswith("hyperctl: error: the agent did not answer")
    assert d._error_line("just this\n\n") == "just this"


def test_jobs_of_a_tenant_make_their_directories_at_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another job made the tenant's parent directory between the check and the mkdir."""
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self == tmp_path / "t"
                        else real_exists(self))
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(d.os, "chown", lambda *a: None)
    d._make_dir(tmp_path / "t" / "builds" / "1")
    assert (tmp_path / "t" / "builds" / "1").is_dir()


def test_the_stage_directory_and_status_are_not_followed_out_of_the_workspace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job owns its workspace's contents: a symlink there must not lead the driver (root)
    to write, chown or read elsewhere on the host, a fifo must not hang it."""
    import os

    monkeypatch.setattr(d.os, "fchown", lambda *a: None)
    workspace, elsewhere = tmp_path / "ws", tmp_path / "host-dir"
    workspace.mkdir()
    elsewhere.mkdir()
    (workspace / d.STAGE_DIR).symlink_to(elsewhere)
    with pytest.raises(OSError):
        d._stage_dir(workspace)
    (workspace / d.STAGE_DIR).unlink()
    stages = d._stage_dir(workspace)
    try:
        (workspace / d.STAGE_DIR / "s.status").write_text("3\n")
        assert d._read_status(stages, "s.status") == 3
        os.mkfifo(workspace / d.STAGE_DIR / "f.status")
        assert d._read_status(stages, "f.status") is None
        (workspace / d.STAGE_DIR / "l.status").symlink_to(elsewhere / "x")
        (elsewhere / "x").write_text("0\n")
        assert d._read_status(stages, "l.status") is None
        assert d._read_status(stages, "missing.status") is None
    finally:
        os.close(stages)
