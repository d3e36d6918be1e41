#!/usr/bin/env python3
"""GitLab Runner custom executor driver: every CI job in its own runv-py VM, through hyperctl.

    runv_gitlab_driver.py [--config FILE] config|prepare|run|cleanup [SCRIPT STAGE]

gitlab-runner calls it once per stage (config.toml's config_exec, prepare_exec, run_exec,
cleanup_exec, each with its stage name as the first argument); the job's data arrive as
CUSTOM_ENV_* variables. One job = one detached hyperctl container `gl-<job id>` of a tenant
derived from the project's namespace, its workspace a host directory mounted at builds_dir and
the tenant's cache directory at cache_dir, with the tenant's egress policy and quotas from the
driver's config (README.md beside this file).

It needs only the Python standard library and hyperctl: gitlab-runner may call it with any
Python >= 3.11. Exit status: 0; $BUILD_FAILURE_EXIT_CODE when the job's script failed (or its
image is not allowed); $SYSTEM_FAILURE_EXIT_CODE when the driver or the sandbox did."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

DRIVER_NAME = "runv-py"
DRIVER_VERSION = "0.1.0"
DEFAULT_CONFIG = Path("/etc/runv/gitlab-runner.toml")
CONFIG_ENV = "RUNV_GITLAB_CONFIG"
NOBODY = 65534            # guest root on a hyperctl volume (docs/security.md: id-mapped volumes)
TIMEOUT_GRACE_S = 300     # the VM outlives the job's own timeout by this much (after_script...)
CONTAINER_PREFIX = "gl-"
SLOT_POLL_S = 0.2
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")   # hyperctl's rule (workload/tenants.py)
_JOB_ID = re.compile(r"^[0-9]{1,20}$")
# An image reference as a job may give it: never an option to hyperctl (a leading '-').
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
# Runs a stage's script (its path in $1) with bash where the image has it, else sh (GitLab's
# bash scripts keep to what busybox sh also runs), and leaves its status beside it: a status
# file is how the driver tells the script's own failure from hyperctl's or the VM's.
GUEST_RUNNER = ('if command -v bash >/dev/null 2>&1; then bash "$1.sh" </dev/null; '
                'else sh "$1.sh" </dev/null; fi; echo $? > "$1.status"')
STAGE_DIR = ".runv-gitlab"      # in the workspace: the stage scripts while they run
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The container's own process: it only keeps the VM up until cleanup removes it.
KEEPALIVE = ("sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done")


class DriverError(Exception):
    """A system failure: one line for the job log, exit $SYSTEM_FAILURE_EXIT_CODE."""


class JobRefused(Exception):
    """A build failure decided before the script ran (e.g. an image the tenant may not use)."""


# -- the driver's config ----------------------------------------------------------------------

QUOTA_KEYS: dict[str, tuple[type, ...]] = {
    "network": (str,), "egress": (str,), "dns": (list,), "memory": (str,), "cpus": (int, float),
    "pids_limit": (int,), "timeout": (int,), "log_max_size": (str,), "rootfs": (str,),
    "disk": (str,), "blkio_weight": (int,), "images": (list,),
}


_KIND_NAMES: dict[type, str] = {str: "a string", int: "a number", list: "a list of strings"}


@dataclass(frozen=True, slots=True)
class Quotas:
    """What a tenant's jobs get: hyperctl run's flags. timeout in seconds; images: glob
    patterns of the image names a job may ask for."""

    network: str = "default"
    egress: str = "none"
    dns: tuple[str, ...] = ()
    memory: str = "1g"
    cpus: float = 1.0
    pids_limit: int = 1024
    timeout: int = 3 * 3600
    log_max_size: str = "16m"
    rootfs: str = ""
    disk: str = ""
    blkio_weight: int | None = None
    images: tuple[str, ...] = ("*",)

    def merged(self, table: Mapping[str, Any], where: str) -> Quotas:
        values: dict[str, Any] = {}
        for key, value in table.items():
            kinds = QUOTA_KEYS.get(key)
            if kinds is None:
                raise DriverError(f"{where}.{key}: not a setting (one of "
                                  f"{', '.join(sorted(QUOTA_KEYS))})")
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise DriverError(f"{where}.{key}: must be {_KIND_NAMES[kinds[0]]}")
            if isinstance(value, list):
                if not all(isinstance(item, str) for item in value):
                    raise DriverError(f"{where}.{key}: must be a list of strings")
                values[key] = tuple(value)
            else:
                values[key] = value
        fields = {name: getattr(self, name) for name in QUOTA_KEYS}
        return Quotas(**{**fields, **values})


@dataclass(frozen=True, slots=True)
class DriverConfig:
    hyperctl: tuple[str, ...] = ("hyperctl",)   # the command, with global options if any
    work_dir: Path = Path("/var/lib/runv-gitlab")
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    default_image: str = "busybox"
    shell: str = "bash"
    tenant: str = ""                        # every job of this runner in one tenant
    tenant_from: str = "root_namespace"     # or "namespace": the project's whole namespace
    tenant_map: tuple[tuple[str, str], ...] = ()   # namespace -> tenant, longest match first
    defaults: Quotas = Quotas()
    tenants: tuple[tuple[str, Quotas], ...] = field(default=())
    max_starting: int = 0     # VMs booting at once on this host (0: the host's CPUs)

    def quotas(self, tenant: str) -> Quotas:
        return dict(self.tenants).get(tenant, self.defaults)


def _str(table: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise DriverError(f"{where}{key}: must be a string")
    return value


def load_config(path: Path | None) -> DriverConfig:
    """The driver's config: `path`, else $RUNV_GITLAB_CONFIG, else DEFAULT_CONFIG (whose absence
    means every default)."""
    explicit = path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    source = explicit or DEFAULT_CONFIG
    try:
        raw = tomllib.loads(source.read_text())
    except FileNotFoundError:
        if explicit is not None:
            raise DriverError(f"driver config {source}: no such file") from None
        raw = {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DriverError(f"driver config {source}: {exc}") from None
    return parse_config(raw, str(source))


def parse_config(raw: Mapping[str, Any], name: str) -> DriverConfig:
    where = f"driver config {name}: "
    base = DriverConfig()
    known = {"hyperctl", "work_dir", "builds_dir", "cache_dir", "default_image", "shell",
             "tenant", "tenant_from", "tenant_map", "defaults", "tenants", "max_starting"}
    for key in raw:
        if key not in known:
            raise DriverError(f"{where}{key}: not a setting (one of {', '.join(sorted(known))})")
    hyperctl = raw.get("hyperctl", ["hyperctl"])
    if isinstance(hyperctl, str):
        hyperctl = [hyperctl]
    if not (isinstance(hyperctl, list) and hyperctl and all(isinstance(a, str) and a
                                                            for a in hyperctl)):
        raise DriverError(f"{where}hyperctl: must be a command (a string or a list of them)")
    work_dir = Path(_str(raw, "work_dir", str(base.work_dir), where))
    if not work_dir.is_absolute():
        raise DriverError(f"{where}work_dir: must be an absolute path")
    dirs = {key: _str(raw, key, getattr(base, key), where)
            for key in ("builds_dir", "cache_dir")}
    for key, value in dirs.items():
        if not value.startswith("/") or value.rstrip("/") == "" or ":" in value:
            raise DriverError(f"{where}{key}: must be an absolute path in the VM other than /")
    tenant = _str(raw, "tenant", "", where)
    if tenant and not _TENANT.match(tenant):
        raise DriverError(f"{where}tenant: {tenant!r} is not a tenant name (1-32 of a-z 0-9 _ -)")
    tenant_from = _str(raw, "tenant_from", "root_namespace", where)
    if tenant_from not in ("root_namespace", "namespace"):
        raise DriverError(f"{where}tenant_from: must be root_namespace or namespace")
    mapping = raw.get("tenant_map", {})
    if not isinstance(mapping, dict):
        raise DriverError(f"{where}tenant_map: must be a table of namespace = tenant")
    for namespace, target in mapping.items():
        if not isinstance(target, str) or not _TENANT.match(target):
            raise DriverError(f"{where}tenant_map.{namespace}: {target!r} is not a tenant name")
    defaults = Quotas().merged(_table(raw, "defaults", where), f"{where}defaults")
    tenants_raw = _table(raw, "tenants", where)
    tenants = []
    for tenant_key, table in tenants_raw.items():
        if not _TENANT.match(tenant_key):
            raise DriverError(f"{where}tenants.{tenant_key}: not a tenant name "
                              "(1-32 of a-z 0-9 _ -)")
        if not isinstance(table, dict):
            raise DriverError(f"{where}tenants.{tenant_key}: must be a table")
        tenants.append((tenant_key, defaults.merged(table, f"{where}tenants.{tenant_key}")))
    max_starting = raw.get("max_starting", 0)
    if isinstance(max_starting, bool) or not isinstance(max_starting, int) or max_starting < 0:
        raise DriverError(f"{where}max_starting: must be a number of VMs, 0 for one per CPU")
    return DriverConfig(
        max_starting=max_starting, hyperctl=tuple(hyperctl), work_dir=work_dir,
        builds_dir=dirs["builds_dir"].rstrip("/"),
        cache_dir=dirs["cache_dir"].rstrip("/"),
        default_image=_str(raw, "default_image", "busybox", where),
        shell=_str(raw, "shell", "bash", where), tenant=tenant, tenant_from=tenant_from,
        tenant_map=tuple(sorted(((k.strip("/").lower(), v) for k, v in mapping.items()),
                                key=lambda kv: -len(kv[0]))),
        defaults=defaults, tenants=tuple(tenants))


def _table(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise DriverError(f"{where}{key}: must be a table")
    return value


# -- the job, from gitlab-runner's environment ------------------------------------------------

def tenant_name(text: str) -> str:
    """A GitLab namespace (path) as a tenant name: itself when it is one; else made one, with
    a hash of the original so that `a.b` and `a-b` stay two tenants."""
    lowered = text.lower()
    if _TENANT.match(lowered):
        return lowered
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", lowered).strip("-_") or "ns"
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[:23]}-{digest}"


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    tenant: str
    image: str
    project_path: str
    timeout_s: int | None    # the job's own timeout (CI_JOB_TIMEOUT), if given

    @property
    def container(self) -> str:
        return f"{CONTAINER_PREFIX}{self.job_id}"


def job_from_env(config: DriverConfig, env: Mapping[str, str]) -> Job:
    def var(name: str) -> str:
        return env.get(f"CUSTOM_ENV_{name}", "")

    job_id = var("CI_JOB_ID")
    if not _JOB_ID.match(job_id):
        raise DriverError(f"CUSTOM_ENV_CI_JOB_ID {job_id!r}: not a job id (is this driver "
                          "called by gitlab-runner's custom executor?)")
    project_path = var("CI_PROJECT_PATH")
    namespace = (var("CI_PROJECT_NAMESPACE") or project_path.rpartition("/")[0]).strip("/")
    if config.tenant:
        tenant = config.tenant
    else:
        if not namespace:
            raise DriverError("CUSTOM_ENV_CI_PROJECT_NAMESPACE (or CI_PROJECT_PATH) is empty: "
                              "cannot tell the job's tenant (set tenant in the driver config)")
        lowered = namespace.lower()
        mapped = next((t for ns, t in config.tenant_map
                       if lowered == ns or lowered.startswith(ns + "/")), None)
        if mapped is not None:
            tenant = mapped
        elif config.tenant_from == "namespace":
            tenant = tenant_name(namespace)
        else:
            root = var("CI_PROJECT_ROOT_NAMESPACE") or namespace.split("/")[0]
            tenant = tenant_name(root)
    timeout = var("CI_JOB_TIMEOUT")
    return Job(job_id=job_id, tenant=tenant, image=var("CI_JOB_IMAGE") or config.default_image,
               project_path=project_path,
               timeout_s=int(timeout) if timeout.isdigit() and int(timeout) > 0 else None)


def exit_code(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.isdigit():
        # gitlab-runner always sets both; called by hand, fail loudly rather than with 0.
        return 1 if name == "BUILD_FAILURE_EXIT_CODE" else 2
    return int(value)


# -- paths on the host ------------------------------------------------------------------------

def tenant_dir(config: DriverConfig, tenant: str) -> Path:
    return config.work_dir / tenant


def workspace(config: DriverConfig, job: Job) -> Path:
    return tenant_dir(config, job.tenant) / "builds" / job.job_id


def cache(config: DriverConfig, job: Job) -> Path:
    return tenant_dir(config, job.tenant) / "cache"


def _make_dir(path: Path) -> None:
    """A directory the job's root may write into (guest root is the host's nobody on a
    volume); its parents root's and closed to others."""
    for parent in reversed(path.parents):
        if not parent.exists():
            # exist_ok: the tenant's other jobs make the same parents at the same time
            parent.mkdir(mode=0o711, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, NOBODY, NOBODY)


# -- hyperctl ---------------------------------------------------------------------------------

class Hyperctl:
    def __init__(self, config: DriverConfig, tenant: str) -> None:
        self.argv = [*config.hyperctl, "--tenant", tenant]
        self.child: subprocess.Popen[bytes] | None = None

    def call(self, *args: str, capture: bool = True) -> tuple[int, str, str]:
        """Run hyperctl: (status, stdout, stderr) when captured, its output passed through
        otherwise. SIGTERM from gitlab-runner (a stage's timeout) reaches hyperctl too."""
        try:
            child = subprocess.Popen([*self.argv, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if capture else None,
                                     stderr=subprocess.PIPE if capture else None)
        except OSError as exc:
            raise DriverError(f"cannot run {self.argv[0]}: {exc.strerror or exc} (set "
                              "hyperctl in the driver config)") from None
        self.child = child
        try:
            out, err = child.communicate()
        finally:
            self.child = None
        return (child.returncode, (out or b"").decode(errors="replace"),
                (err or b"").decode(errors="replace").strip())

    def forward(self, signum: int) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def state(self, name: str) -> dict[str, Any] | None:
        """The container's state (hyperctl inspect's), None when there is no such container."""
        code, out, _ = self.call("inspect", name)
        if code != 0:
            return None
        try:
            state: dict[str, Any] = json.loads(out)[0]["state"]
        except (ValueError, LookupError, TypeError):
            return None
        return state


def _error_line(text: str) -> str:
    """hyperctl's error line (a guest console's tail may follow it), else its last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("hyperctl: error:")),
                lines[-1] if lines else "(no message)")


# -- the stages -------------------------------------------------------------------------------

def stage_config(config: DriverConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """config_exec's answer (stdout, JSON): where builds and caches are in the VM."""
    job = job_from_env(config, env)
    return {
        "builds_dir": config.builds_dir,
        "cache_dir": config.cache_dir,
        "builds_dir_is_shared": False,       # one VM and one workspace per job
        "hostname": job.container,
        "driver": {"name": DRIVER_NAME, "version": DRIVER_VERSION},
        "shell": config.shell,
    }


def run_arguments(config: DriverConfig, job: Job) -> list[str]:
    """hyperctl run's arguments for the job's sandbox."""
    quotas = config.quotas(job.tenant)
    if not _IMAGE.match(job.image):
        raise JobRefused(f"image {job.image!r} is not an image reference")
    if not any(fnmatch.fnmatchcase(job.image, pattern) for pattern in quotas.images):
        raise JobRefused(f"image {job.image!r} is not one tenant {job.tenant!r} may use "
                         f"(allowed: {', '.join(quotas.images) or 'none'})")
    timeout = quotas.timeout if job.timeout_s is None else min(
        quotas.timeout, job.timeout_s + TIMEOUT_GRACE_S)
    args = ["run", "-d", "--name", job.container, "--hostname", job.container,
            "--network", quotas.network, "--memory", quotas.memory,
            "--cpus", f"{quotas.cpus:g}", "--pids-limit", str(quotas.pids_limit),
            "--timeout", f"{timeout}s", "--log-max-size", quotas.log_max_size,
            "-v", f"{workspace(config, job)}:{config.builds_dir}",
            "-v", f"{cache(config, job)}:{config.cache_dir}"]
    if quotas.network != "none":
        args += ["--egress", quotas.egress]
        for server in quotas.dns:
            args += ["--dns", server]
    if quotas.rootfs:
        args += ["--rootfs", quotas.rootfs]
    if quotas.disk:
        args += ["--disk", quotas.disk]
    if quotas.blkio_weight is not None:
        args += ["--blkio-weight", str(quotas.blkio_weight)]
    return [*args, job.image, *KEEPALIVE]


def stage_prepare(config: DriverConfig, job: Job, hyperctl: Hyperctl) -> None:
    """Start the job's sandbox; on failure nothing of it is left (cleanup runs anyway)."""
    args = run_arguments(config, job)
    try:
        _make_dir(workspace(config, job))
        _make_dir(cache(config, job))
    except OSError as exc:
        raise DriverError(f"cannot make the job's directories under {config.work_dir}: "
                          f"{exc.strerror or exc}") from None
    print(f"Starting a runv-py VM for job {job.job_id} (tenant {job.tenant}, image "
          f"{job.image})", flush=True)
    with starting_slot(config):
        code, _, err = hyperctl.call(*args)
    if code != 0:
        remove_job(config, job, hyperctl)
        raise DriverError(f"the job's VM did not start: {_error_line(err)}")


@contextlib.contextmanager
def starting_slot(config: DriverConfig) -> Iterator[None]:
    """One of max_starting slots for a booting VM: a boot under TCG is CPU-bound, and many at
    once all take longer than one after another (past the runtime's boot timeout). A slot is
    an flock, released when its holder ends however it ends."""
    slots = config.max_starting or os.cpu_count() or 1
    directory = config.work_dir / ".starting"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    held = None
    while held is None:
        for i in range(slots):
            fd = os.open(directory / f"slot-{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held = fd
            break
        else:
            time.sleep(SLOT_POLL_S)
    try:
        yield
    finally:
        os.close(held)


def stage_run(config: DriverConfig, job: Job, hyperctl: Hyperctl, script: Path, name: str,
              *, env: Mapping[str, str]) -> int:
    """Run one stage's script in the job's VM (its output goes to the job log); the exit
    status for gitlab-runner. The script reaches the VM as a file in the workspace (guest
    root's, closed to others), removed afterwards."""
    if not _STAGE_NAME.match(name):
        raise DriverError(f"stage name {name!r}: not a GitLab stage name")
    base = f"{name}-{os.getpid()}"
    try:
        text = script.read_bytes()
        stages = _stage_dir(workspace(config, job))
    except OSError as exc:
        if hyperctl.state(job.container) is None:     # cleaned up, workspace and all
            raise DriverError("the job's VM cannot run the stage: it is gone") from None
        raise DriverError(f"stage {name}: cannot hand its script to the VM: "
                          f"{exc.strerror or exc}") from None
    try:
        try:
            fd = os.open(f"{base}.sh", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=stages)
            with os.fdopen(fd, "wb") as out:
                os.fchown(out.fileno(), NOBODY, NOBODY)
                out.write(text)
        except OSError as exc:
            raise DriverError(f"stage {name}: cannot hand its script to the VM: "
                              f"{exc.strerror or exc}") from None
        code, _, _ = hyperctl.call("exec", job.container, "sh", "-c", GUEST_RUNNER, "sh",
                                   f"{config.builds_dir}/{STAGE_DIR}/{base}", capture=False)
        status = _read_status(stages, f"{base}.status")
        for leftover in (f"{base}.sh", f"{base}.status"):
            with contextlib.suppress(OSError):
                os.unlink(leftover, dir_fd=stages)
    finally:
        os.close(stages)
    if status is None:
        # The script did not finish: hyperctl could not run it, or the VM is gone.
        state = hyperctl.state(job.container)
        why = ("it is gone" if state is None else "it ran past its timeout"
               if state.get("timed_out") else f"hyperctl exec exited {code}"
               if state.get("status") == "running"
               else f"it is {state.get('status')} (exit code {state.get('exit_code')})")
        raise DriverError(f"the job's VM cannot run the stage: {why}")
    if status == 0:
        return 0
    code_file = env.get("BUILD_EXIT_CODE_FILE")
    if code_file:
        with contextlib.suppress(OSError):
            Path(code_file).write_text(f"{status}\n")
    return exit_code(env, "BUILD_FAILURE_EXIT_CODE")


def _stage_dir(workspace_dir: Path) -> int:
    """The stage scripts' directory in the workspace, opened without following a symlink:
    the job owns what is in its workspace and may have put one there."""
    top = os.open(workspace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(STAGE_DIR, 0o700, dir_fd=top)
        stages = os.open(STAGE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=top)
    finally:
        os.close(top)
    try:
        os.fchown(stages, NOBODY, NOBODY)
        os.fchmod(stages, 0o700)
    except OSError:
        os.close(stages)
        raise
    return stages


def _read_status(directory: int, name: str) -> int | None:
    """The status the guest wrote (a regular file: the job may have put a fifo there)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=directory)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 32).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def remove_job(config: DriverConfig, job: Job, hyperctl: Hyperctl) -> list[str]:
    """Remove the job's sandbox and workspace (idempotent); what could not be removed."""
    problems = []
    code, _, err = hyperctl.call("rm", "-f", job.container)
    if code != 0 and "no such container" not in err.lower():
        problems.append(f"hyperctl rm {job.container}: {_error_line(err)}")
    # rmtree works on file descriptors: a symlink the job left is removed, not followed.
    shutil.rmtree(workspace(config, job), ignore_errors=True)
    if workspace(config, job).exists():
        problems.append(f"cannot remove {workspace(config, job)}")
    return problems


def stage_cleanup(config: DriverConfig, job: Job, hyperctl: Hyperctl) -> None:
    problems = remove_job(config, job, hyperctl)
    if problems:
        raise DriverError("; ".join(problems))


# -- the command ------------------------------------------------------------------------------

def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="runv_gitlab_driver.py",
                                     description="GitLab Runner custom executor on runv-py")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"driver config (default ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    parser.add_argument("stage", choices=("config", "prepare", "run", "cleanup"))
    parser.add_argument("script", nargs="?", type=Path, help="run: the stage's script")
    parser.add_argument("stage_name", nargs="?", help="run: the stage's name")
    args = parser.parse_args(argv)
    if args.stage == "run" and (args.script is None or args.stage_name is None):
        parser.error("run needs the script's path and the stage's name")
    return args


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    failure = exit_code(env, "SYSTEM_FAILURE_EXIT_CODE")
    hyperctl: Hyperctl | None = None

    def terminated(signum: int, _frame: FrameType | None) -> None:
        if hyperctl is not None:
            hyperctl.forward(signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        config = load_config(args.config)
        if args.stage == "config":
            json.dump(stage_config(config, env), sys.stdout)
            sys.stdout.write("\n")
            return 0
        job = job_from_env(config, env)
        hyperctl = Hyperctl(config, job.tenant)
        if args.stage == "prepare":
            stage_prepare(config, job, hyperctl)
            return 0
        if args.stage == "run":
            return stage_run(config, job, hyperctl, args.script, args.stage_name, env=env)
        stage_cleanup(config, job, hyperctl)
        return 0
    except JobRefused as exc:
        print(f"runv-py: {exc}", file=sys.stderr)
        return exit_code(env, "BUILD_FAILURE_EXIT_CODE")
    except DriverError as exc:
        print(f"runv-py: {args.stage}: {exc}", file=sys.stderr)
        return failure


if __name__ == "__main__":
    sys.exit(main())
