"""The warm pool (`runv pool serve`): idle supervisors whose VMs were restored from the template
before the container asked; `runv run` claims one, the pool refills, nothing outlives the
service. Real VMs, pool size 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runv_py import child, config
from runv_py.api import Sandbox as ApiSandbox
from runv_py.sandbox import cgroup, vm_dir, vm_template
from runv_py.sandbox.client import pool_call
from runv_py.sandbox.control import BlockingChannel
from runv_py.sandbox.protocol import Adopt, Claim, PoolMemberStatus, PoolStatus
from runv_py.storage import shared
from tests.cli.conftest import LATE_CHECK, LATE_SEEN, RUNV, Runv, late_binds, runv, subreaper  # noqa: F401
from tests.cli.test_pod import SERVE, annotated
from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401
from tests.integration.conftest import IMAGE, Containerd, image_archive, runtime_env  # noqa: F401
from tests.integration.test_shim import RUNTIME as SHIM_RUNTIME
from tests.integration.test_shim import cd, shim_env  # noqa: F401
from tests.network.conftest import Lab, lab, peer_http, with_netns  # noqa: F401
from tests.vm.conftest import processes_mentioning

READY_S = 240


class Pool:
    """A `runv pool serve` of the test's own (its state_dir is the Runv's)."""

    def __init__(self, env: dict[str, str], config: Path, state: Path, top: Path,
                 extra_config: str) -> None:
        self.env, self.config, self.state = env, config, state
        with config.open("a") as out:
            out.write(extra_config)
        self.log = top / "pool.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([RUNV, "--debug", "pool", "serve"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.socket = state / "pool" / "pool.sock"

    @classmethod
    def of(cls, tool: Runv | Hyperctl, extra_config: str) -> Pool:
        return cls(tool.env, tool.config, tool.state, tool.top, extra_config)

    def status(self) -> dict[str, Any]:
        done = subprocess.run([RUNV, "pool", "status", "--format", "json"], env=self.env,
                              capture_output=True, check=True, timeout=60)
        return dict(json.loads(done.stdout))

    def wait(self, what: Callable[[dict[str, Any]], bool], timeout_s: float = READY_S
             ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"pool serve exited: {self.log.read_text()[-3000:]}"
            if self.socket.exists():
                status = self.status()
                if what(status):
                    return status
            assert time.monotonic() < deadline, \
                f"pool never got there: {self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def idle(self, count: int = 1) -> dict[str, Any]:
        return self.wait(lambda s: sum(k["idle"] for k in s["keys"].values()) == count
                         and not any(k["starting"] for k in s["keys"].values()))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def leftovers(self) -> list[str]:
        """Processes and state of pooled VMs (their supervisors name the config file)."""
        found = processes_mentioning(str(self.config))
        found += processes_mentioning(str(self.state))
        for base in (self.state / "sandboxes", self.state / "pool" / "shares"):
            if base.exists():
                found += [f"state: {p}" for p in base.iterdir()]
        if self.socket.exists():
            found.append(f"socket: {self.socket}")
        if self.proc.poll() == 0 and (self.state / "pool").exists():
            found += [f"pool state: {p}" for p in (self.state / "pool").rglob("*")]
        return found


@pytest.fixture
def pool(runv: Runv) -> Iterator[Callable[[str], Pool]]:  # noqa: F811
    started: list[Pool] = []

    def start(extra_config: str = "[pool]\nsize = 1\n") -> Pool:
        started.append(Pool.of(runv, extra_config))
        return started[-1]

    yield start
    for each in started:
        each.stop(signal.SIGKILL if each.proc.poll() is None else 0)


def _members(status: dict[str, Any], state: str) -> list[dict[str, Any]]:
    return [m for m in status["members"] if m["state"] == state]


def _running(pid: int) -> bool:
    """Not a zombie either: orphans come to this test process (a subreaper), which reaps."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.2)


def test_run_takes_a_pooled_vm_the_pool_refills_and_each_tenant_gets_its_own(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """size 2 under a 400 MiB ceiling holds one 256 MiB VM. `runv run` takes it (its QEMU
    was running before the run), the pool starts another, the next run gets that one: its
    own random bytes, none of the first tenant's files, the first VM gone."""
    service = pool("[pool]\nsize = 2\nmemory_mib = 400\n")
    status = service.idle(1)
    time.sleep(3)  # the ceiling, not the size, holds it at one
    status = service.status()
    assert len(_members(status, "idle")) == 1 and status["memory_mib"] == 256, status
    first_qemu = _members(status, "idle")[0]["qemu_pid"]
    assert first_qemu and _running(first_qemu)

    script = "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; ls /tmp; echo x > /tmp/{}"
    one = runv.bundle(["sh", "-c", script.format("tenant1")])
    result = runv("--debug", "run", "--bundle", str(one), "p1")
    log = (runv.top / "log.json").read_text()
    assert f"created (pool, sandbox {_members(status, 'idle')[0]['sandbox']}, QEMU pid " \
           f"{first_qemu})" in log, log[-2000:]
    random1, listing1 = result.stdout.decode().split("\n", 1)
    assert listing1 == ""

    status = service.idle(1)
    second = _members(status, "idle")[0]
    assert second["qemu_pid"] != first_qemu
    _gone([first_qemu])  # used once, destroyed with its container
    two = runv.bundle(["sh", "-c", script.format("tenant2")])
    result = runv("--debug", "run", "--bundle", str(two), "p2")
    assert f"QEMU pid {second['qemu_pid']})" in (runv.top / "log.json").read_text()
    random2, listing2 = result.stdout.decode().split("\n", 1)
    assert listing2 == "" and len(random1) == len(random2) == 32 and random1 != random2
    assert (one / "rootfs/tmp/tenant1").exists() and not (two / "rootfs/tmp/tenant1").exists()

    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


def _idle_at_once(service: Pool) -> PoolMemberStatus:
    """The pool's first idle member, seen within milliseconds of its ready report."""
    deadline = time.monotonic() + READY_S
    while True:
        with contextlib.suppress(OSError):
            reply = asyncio.run(pool_call(service.socket, PoolStatus()))
            idle = [m for m in reply.members if m.state == "idle"]
            if idle:
                return idle[0]
        assert time.monotonic() < deadline, service.log.read_text()[-3000:]
        time.sleep(0.005)


def _stopped_in_its_warm_up(service: Pool, runv: Runv) -> PoolMemberStatus:  # noqa: F811
    """An idle member whose QEMU the test stopped (SIGSTOP) right after its ready report, in
    the middle of its warm-up."""
    for attempt in range(3):
        member = _idle_at_once(service)
        assert member.qemu_pid is not None
        os.kill(member.qemu_pid, signal.SIGSTOP)
        if not any("pooled VM warmed up" in line and member.sandbox in line
                   for line in service.log.read_text().splitlines()):
            return member
        # The test saw the member only after its warm-up: take it, and try the refill.
        os.kill(member.qemu_pid, signal.SIGCONT)
        runv("run", "--bundle", str(runv.bundle(["true"])), f"early{attempt}")
    pytest.fail("the pool's members were always seen after their warm-up")


def test_a_pooled_vm_warms_up_after_its_ready_report_and_a_claim_waits_for_the_warm_up(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """A member counts as idle once its agent answers, and warms up (then parks) after that,
    so that refills keep up with back-to-back claims. Its QEMU is stopped right after the
    ready report, in the middle of the warm-up: a claim then waits for the warm-up's end and
    gets the VM running, not parked. Unclaimed, a member parks after its warm-up."""
    service = pool("[pool]\nsize = 1\n")
    member = _stopped_in_its_warm_up(service, runv)
    assert member.qemu_pid is not None
    frozen = 2.0
    threading.Timer(frozen, os.kill, (member.qemu_pid, signal.SIGCONT)).start()
    started = time.monotonic()
    result = runv("--debug", "run", "--bundle", str(runv.bundle(["echo", "warm"])), "w1")
    assert result.stdout == b"warm\n"
    assert time.monotonic() - started >= frozen
    created = [line for line in (runv.top / "log.json").read_text().splitlines()
               if f"QEMU pid {member.qemu_pid})" in line]
    assert created, (runv.top / "log.json").read_text()[-2000:]
    waited = re.search(r"warm_up_wait (\d+) ms", created[0])
    assert waited and int(waited[1]) >= 1000, created[0]
    assert not any("warmed up and parked" in line and member.sandbox in line
                   for line in service.log.read_text().splitlines())

    refill = _members(service.idle(1), "idle")[0]
    service.wait(lambda _: any("warmed up and parked" in line and refill["sandbox"] in line
                               for line in service.log.read_text().splitlines()), 60)
    assert service.stop() == 0
    assert service.leftovers() == []


def test_a_claim_gives_up_on_a_warm_up_that_does_not_end(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """A pooled VM whose warm-up hangs (its QEMU stopped for good after the ready report):
    the hand-over fails after WARM_UP_WAIT_S, the run starts a sandbox of its own, and the
    hung member is destroyed, its stopped QEMU with it."""
    service = pool("[pool]\nsize = 1\n")
    member = _stopped_in_its_warm_up(service, runv)
    assert member.qemu_pid is not None
    result = runv("--debug", "run", "--bundle", str(runv.bundle(["echo", "own"])), "h1")
    assert result.stdout == b"own\n"
    log = (runv.top / "log.json").read_text()
    assert "warm-up did not end within" in log, log[-2000:]
    assert f"QEMU pid {member.qemu_pid})" not in log
    _gone([member.pid, member.qemu_pid])
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


def test_members_and_their_vsock_backends_are_forks_of_the_service(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """`runv pool serve` makes room on its own command line when it starts, so that its
    members' vsock backends, which show their VM directory there, are forked too (sharing the
    service's pages) rather than new interpreters."""
    service = pool("[pool]\nsize = 1\n")
    member = _members(service.idle(1), "idle")[0]
    backends = [line for line in processes_mentioning(f"/{member['sandbox']}/")
                if "-m runv_py.vsock --socket=" in line]
    assert len(backends) == 2, backends  # the keeper and its worker
    assert "a new interpreter instead of a fork" not in service.log.read_text()
    assert service.stop() == 0
    assert service.leftovers() == []


def test_sigterm_destroys_idle_vms_and_kill_9_makes_them_destroy_themselves(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    # What a crashed sandbox left: the pool service's reconciler removes it when it starts.
    gone = subprocess.Popen(["true"])
    gone_start = child.proc_start_time(gone.pid)
    gone.wait()
    left = runv.state / "sandboxes" / f"{vm_dir.CLAIM_PREFIX}{gone.pid}-{gone_start}-ab"
    left.mkdir(parents=True)   # its claimant died before it wrote the owner file
    service = pool("[pool]\nsize = 1\nidle = \"running\"\n")
    status = service.idle(1)
    idle = _members(status, "idle")[0]
    assert not left.exists(), "the pool service's reconciler did not run at its start"
    assert service.stop(signal.SIGTERM) == 0
    assert service.leftovers() == [], "SIGTERM left things behind"
    assert not _running(idle["qemu_pid"])

    service = pool("")  # the same [pool] section
    status = service.idle(1)
    idle = _members(status, "idle")[0]
    service.stop(signal.SIGKILL)
    _gone([idle["pid"], idle["qemu_pid"]], 30)
    assert [p for p in service.leftovers() if not p.startswith("socket")] == []


def test_a_claim_without_adopt_or_an_abandoned_adopt_leaks_nothing(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """A claimant that dies after the claim (no adopt comes) or in the middle of the adopt:
    the pooled supervisor destroys its VM; an empty pool answers a claim with no VM."""
    service = pool("[pool]\nsize = 1\n")
    status = service.idle(1)
    key = next(iter(status["keys"]))
    claim = asyncio.run(pool_call(service.socket, Claim(key=key)))
    assert claim.ctl and claim.pid == _members(status, "idle")[0]["pid"]
    again = asyncio.run(pool_call(service.socket, Claim(key=key)))
    assert again.ctl is None and again.why == "empty"
    _gone([claim.pid, claim.qemu_pid], 60)  # no adopt within ADOPT_WAIT_S

    status = service.idle(1)
    claim = asyncio.run(pool_call(service.socket, Claim(key=key)))
    assert claim.ctl is not None
    bundle = runv.bundle(["true"])
    fds = [os.dup(2), shared.detached_tree(bundle / "rootfs", "root.path")]
    channel = BlockingChannel.connect(Path(claim.ctl), 60)
    try:
        channel.send(Adopt(id="abandoned", root=str(runv.root), bundle=str(bundle),
                           trees=("root",)).to_wire(), fds)
    finally:
        channel.close()
        for fd in fds:
            os.close(fd)
    _gone([claim.pid, claim.qemu_pid], 60)
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


def test_a_pool_miss_falls_back_to_the_template_path(runv: Runv) -> None:  # noqa: F811
    bundle = runv.bundle(["echo", "fallback"])
    result = runv("--debug", "run", "--bundle", str(bundle), "m1")
    assert result.stdout == b"fallback\n"
    log = (runv.top / "log.json").read_text()
    assert "warm pool: not used (no pool service)" in log and "created (template" in log
    assert runv.leftovers() == []


def test_hyperctl_run_rm_takes_a_pooled_vm_and_template_off_bypasses_the_pool(
        hyperctl: Hyperctl) -> None:  # noqa: F811
    service = Pool.of(hyperctl, "[pool]\nsize = 1\n")
    try:
        status = service.idle(1)
        idle = _members(status, "idle")[0]
        result = hyperctl("--debug", "run", "--rm", "busybox", "echo", "pooled")
        assert result.stdout == b"pooled\n"
        assert f"QEMU pid {idle['qemu_pid']})" in result.stderr.decode(), result.stderr
        status = service.idle(1)
        idle = _members(status, "idle")[0]
        result = hyperctl("--debug", "run", "--rm", "--template", "off", "busybox", "echo",
                          "cold")
        assert result.stdout == b"cold\n"
        err = result.stderr.decode()
        assert "warm pool: not used (template is off)" in err, err
        assert "created (cold, agent over vsock)" in err, err
        assert _members(service.status(), "idle")[0]["pid"] == idle["pid"]
        assert service.stop() == 0
        assert service.leftovers() == []
    finally:
        service.stop(signal.SIGKILL)


def test_a_pods_sandbox_from_the_pool_takes_the_pods_other_containers(
        runv: Runv, pool: Callable[[str], Pool], tmp_path: Path) -> None:  # noqa: F811
    """A pooled supervisor, once claimed, is a pod's like any other: the second container
    joins its VM (rootfs as a detached tree into the member's share) and reaches localhost."""
    service = pool("[pool]\nsize = 1\n")
    idle = _members(service.idle(1), "idle")[0]
    sandbox = runv.bundle(["sh", "-c", SERVE], annotated("sandbox", "pod1", "9p"))
    runv("--debug", "create", "--bundle", str(sandbox), "pod1")
    assert f"QEMU pid {idle['qemu_pid']})" in (runv.top / "log.json").read_text()
    runv("start", "pod1")

    def member(spec: dict[str, Any]) -> None:
        annotated("container", "pod1", "9p")(spec)
        spec["hostname"] = ""

    client = runv.bundle(["sh", "-c", "for i in $(seq 50); do wget -qO- "
                          "http://127.0.0.1:8080/ && break; sleep 0.2; done"], member)
    out = tmp_path / "c1.out"
    with open(out, "wb") as sink:
        runv("create", "--bundle", str(client), "c1", stdout=sink)
    runv("start", "c1")
    runv.wait_status("c1", "stopped")
    assert out.read_bytes() == b"pod-hello\n"
    runv("delete", "c1")
    runv("delete", "--force", "pod1")
    _gone([idle["pid"], idle["qemu_pid"]])
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


def test_the_containerd_shim_takes_a_pooled_vm(
        cd: Containerd, runtime_env: dict[str, str]) -> None:  # noqa: F811
    """containerd mounts the snapshot in its own namespace; the shim hands the claimed
    supervisor a detached tree of it."""
    config = Path(runtime_env["RUNV_CONFIG"])
    state = Path(config.read_text().split('"')[1])
    service = Pool(runtime_env, config, state, config.parent, "[pool]\nsize = 1\n")
    try:
        idle = _members(service.idle(1), "idle")[0]
        result = cd.ctr("run", "--rm", *SHIM_RUNTIME, IMAGE, "p1", "sh", "-c",
                        "echo from-the-pool; ls /", check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"from-the-pool\n") and b"bin" in result.stdout
        assert service.status()["claims"] == 1
        _gone([idle["pid"], idle["qemu_pid"]])  # the container's VM, gone with it
        service.idle(1)
        assert service.stop() == 0
        assert service.leftovers() == []
    finally:
        service.stop(signal.SIGKILL)


def test_the_api_takes_a_pooled_vm_of_its_size(hyperctl: Hyperctl,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI job's sandbox (64 MiB for the job: a 320 MiB VM) comes from the pool when that
    size is kept warm ([pool] sizes)."""
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    service = Pool.of(hyperctl, "[pool]\nsize = 1\nsizes = [[320, 1]]\n")
    try:
        status = service.idle(2)
        key = next(k for k, v in status["keys"].items() if v["memory_mib"] == 320)
        with ApiSandbox.create("busybox", memory="64m", cpus=1, timeout=600) as box:
            assert box.run(["sh", "-c", "echo api-pooled"], check=True).stdout \
                == b"api-pooled\n"
            status = service.status()
            assert status["claims"] == 1 and status["keys"][key]["claimed_running"] == 1
        service.idle(2)
        assert service.stop() == 0
        assert service.leftovers() == []
    finally:
        service.stop(signal.SIGKILL)


def test_the_pool_follows_rebuilt_assets(runv: Runv, pool: Callable[[str], Pool],  # noqa: F811
                                         tmp_path: Path, assets_dir: Path) -> None:
    """A rebuilt kernel means new template keys: the first claim that misses because of it
    makes the pool drop its stale idle VMs and fill with the new key's."""
    assets = tmp_path / "assets"
    (assets / "kernel").mkdir(parents=True)
    real = (assets_dir / "kernel").resolve()
    shutil.copy(real / "vmlinux", assets / "kernel" / "vmlinux")
    for name in ("bzImage", "config", "version"):
        (assets / "kernel" / name).symlink_to(real / name)
    (assets / "rootfs").symlink_to((assets_dir / "rootfs").resolve())
    runv.env["RUNV_ASSETS_DIR"] = str(assets)
    store = vm_template.TemplateStore(config.load(runv.config).template_dir)
    try:
        service = pool("[pool]\nsize = 1\n")
        status = service.idle(1)
        old = _members(status, "idle")[0]
        os.utime(assets / "kernel" / "vmlinux")  # as a rebuild would
        result = runv("--debug", "run", "--bundle", str(runv.bundle(["echo", "rebuilt"])),
                      "r1")
        assert result.stdout == b"rebuilt\n"
        status = service.idle(1)
        (new_key,) = status["keys"]
        assert new_key != old["key"]
        # The claim taught the pool the new key (so it found it empty), then fell back.
        assert f"warm pool: not used (empty (key {new_key}))" in \
            (runv.top / "log.json").read_text()
        _gone([old["pid"], old["qemu_pid"]])
        assert _members(status, "idle")[0]["key"] in status["keys"]
        assert service.stop() == 0
        assert service.leftovers() == []
    finally:
        for made in store.templates():
            if str(assets) in str(made.meta().get("inputs", {}).get("kernel", "")):
                store.remove(made)


def test_a_bad_bundle_fails_as_without_the_pool_and_costs_no_pooled_vm(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    service = pool("[pool]\nsize = 1\n")
    idle = _members(service.idle(1), "idle")[0]
    bundle = runv.bundle(["true"])
    shutil.rmtree(bundle / "rootfs")
    result = runv("run", "--bundle", str(bundle), "bad", check=False)
    assert result.returncode != 0 and b"root.path" in result.stderr, result.stderr
    status = service.status()
    assert status["claims"] == 0 and _members(status, "idle")[0]["pid"] == idle["pid"]
    assert service.stop() == 0
    assert service.leftovers() == []


def test_bind_sources_mounted_after_the_pool_started_reach_the_container(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """The pooled supervisor's mount namespace is older than the tmpfs the sources are on:
    they come as detached trees, read-only where asked."""
    service = pool("[pool]\nsize = 1\n")
    idle = _members(service.idle(1), "idle")[0]
    with late_binds(runv.top) as late:
        bundle = runv.bundle(["sh", "-c", LATE_CHECK], late)
        result = runv("--debug", "run", "--bundle", str(bundle), "late")
        assert f"QEMU pid {idle['qemu_pid']})" in (runv.top / "log.json").read_text()
        assert result.stdout == LATE_SEEN
        assert (runv.top / "late" / "dir" / "out.txt").read_text() == "out\n"
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


def test_a_claimed_sandbox_joins_the_claimants_cgroups(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """As a supervisor `runv create` starts inherits its creator's cgroups, a pooled one moves
    into its claimant's on the claim, with its QEMU and vsock backend: here two v1
    hierarchies and the v2 one (this host is hybrid)."""
    service = pool("[pool]\nsize = 1\n")
    idle = _members(service.idle(1), "idle")[0]
    mine = cgroup.memberships()
    wanted = {c: f"{mine[c].rstrip('/')}/runv-claimant-{os.getpid()}"
              for c in ("memory", "pids", "") if c in mine}
    dirs = [root / wanted[c].lstrip("/") for c, root in cgroup.roots(wanted).items()]
    assert len(dirs) == 3, dirs
    for path in dirs:
        path.mkdir()
    try:
        def enter() -> None:
            for path in dirs:
                (path / "cgroup.procs").write_text(str(os.getpid()))

        bundle = runv.bundle(["sleep", "60"])
        # Not pipes: the container's stand-in keeps its stdio.
        subprocess.run(runv.argv("create", "--bundle", str(bundle), "cg"), env=runv.env,
                       preexec_fn=enter, check=True, timeout=180, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sandbox = child.with_descendants(idle["pid"])
        assert idle["qemu_pid"] in sandbox and len(sandbox) >= 4, sandbox  # + vsock backend
        for pid in sandbox:
            assert {c: p for c, p in cgroup.memberships(pid).items() if c in wanted} == wanted
        runv("delete", "--force", "cg")
        _gone(sandbox)
    finally:
        for path in dirs:
            deadline = time.monotonic() + 30
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    assert time.monotonic() < deadline, (path / "cgroup.procs").read_text()
                    time.sleep(0.2)
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


def test_sighup_reloads_the_config(runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    """More VMs per size, then a config that does not load (nothing changes), then a lower
    ceiling: the VM over it is destroyed."""
    service = pool("[pool]\nsize = 1\n")
    first = _members(service.idle(1), "idle")[0]
    base = service.config.read_text().partition("[pool]")[0]

    def reload(pool_section: str) -> None:
        service.config.write_text(base + pool_section)
        service.proc.send_signal(signal.SIGHUP)

    reload("[pool]\nsize = 2\n")
    idle = _members(service.idle(2), "idle")
    assert first["pid"] in [m["pid"] for m in idle] and service.status()["size"] == 2
    reload("[pool]\nsize = [2\n")
    deadline = time.monotonic() + 30
    while "config not reloaded" not in service.log.read_text():
        assert time.monotonic() < deadline, service.log.read_text()[-2000:]
        time.sleep(0.3)
    status = asyncio.run(pool_call(service.socket, PoolStatus())).fields()  # as `runv` does
    assert status["size"] == 2 and len(_members(status, "idle")) == 2
    reload("[pool]\nsize = 2\nmemory_mib = 300\n")
    status = service.idle(1)
    assert status["memory_ceiling_mib"] == 300
    gone = [m for m in idle if m["pid"] not in [k["pid"] for k in _members(status, "idle")]]
    assert len(gone) == 1
    _gone([gone[0]["pid"], gone[0]["qemu_pid"]])
    assert service.stop() == 0
    assert service.leftovers() == []


def test_a_claimed_supervisor_killed_with_sigkill_leaves_nothing_once_deleted(
        runv: Runv, pool: Callable[[str], Pool]) -> None:  # noqa: F811
    service = pool("[pool]\nsize = 1\n")
    idle = _members(service.idle(1), "idle")[0]
    runv("create", "--bundle", str(runv.bundle(["sleep", "60"])), "k1")
    assert runv.supervisor_pid("k1") == idle["pid"]
    os.kill(idle["pid"], signal.SIGKILL)
    _gone([idle["pid"], idle["qemu_pid"]], 30)
    runv("delete", "--force", "k1")
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []


@pytest.mark.parametrize("idle", ["paused", "running"])
def test_a_pooled_vm_gets_the_containers_network(runv: Runv, pool: Callable[[str], Pool],  # noqa: F811
                                                 lab: Lab, idle: str) -> None:  # noqa: F811
    """The claimed VM hot-plugs the NICs of the container's network namespace (into a
    stopped VM, or a running one)."""
    net = lab.subnet
    container, peer = lab.pair(9)
    peer_http(lab, peer, f"10.{net}.9.1")
    service = pool(f'[pool]\nsize = 1\nidle = "{idle}"\n')
    member = _members(service.idle(1), "idle")[0]
    bundle = runv.bundle(["sh", "-c", f"wget -q -O - http://10.{net}.9.1:8080/ | head -n 1"],
                         with_netns(lab.path(container)))
    result = runv("--debug", "run", "--bundle", str(bundle), "n1")
    assert f"QEMU pid {member['qemu_pid']})" in (runv.top / "log.json").read_text()
    assert "mss=" in result.stdout.decode(), result.stdout + result.stderr
    assert lab.mirror_state(container) == []
    service.idle(1)
    assert service.stop() == 0
    assert service.leftovers() == []
