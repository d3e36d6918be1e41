"""bench/soak: fault injection across the front doors. Each iteration drives one sandbox
through a random front door (runv, containerd's shim, hyperctl, the Python API) and a random
sequence of operations, and at a random moment SIGKILLs or SIGSTOPs a random host process of
that sandbox (supervisor, QEMU, vsock keeper or worker, stand-in, shim, monitor, the API's
owner). Then it checks:

- every operation ended within OP_TIMEOUT_S, with a one-line error if it failed, and none
  failed before the fault;
- what the door reports is the truth: a sandbox reported running answers an exec, and one
  whose QEMU is gone is not reported running;
- after the door's own forced removal and the reconciler (`runv gc`, `hyperctl system prune
  -f`, when this checkout has them) nothing of the sandbox is left: processes, files under
  the state and data roots, mounts, network namespaces, nftables tables, iptables rules,
  cgroups. A shim stopped for good is SIGKILLed first, as an operator would: containerd
  waits for a stopped shim (runc's too) without a limit.

    python bench/soak.py [--iterations 20] [--seed N] [--doors runv,hyperctl,api,shim]
                         [--json FILE]

Exit status 1 when any iteration found something (its roots are then kept for a look, with a
copy of the iteration's logs taken before its forced removal in <roots>/logs/<iteration>). Every
process it kills was started for the iteration (found by the iteration's own roots in its
command line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bundle
from runv_py import child

BIN = Path(sys.executable).parent
OP_TIMEOUT_S = 150.0
SETTLE_S = 30.0
IMAGE = "docker.io/library/soak:latest"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class HostProcess:
    pid: int
    kind: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class OpResult:
    op: str
    code: int | None  # None: did not end within OP_TIMEOUT_S
    error: str
    seconds: float
    detail: str = ""  # the end of stderr of a failed op


@dataclass(frozen=True)
class Fault:
    kind: str
    signum: int
    during: str
    pid: int
    resume_after_s: float | None = None  # a SIGSTOP undone with SIGCONT; None: never

    @property
    def frozen(self) -> bool:
        """Stopped for good: what waits on it may wait for ever, as it would with runc on a
        frozen cgroup (the processes in a stopped VM neither run nor exit)."""
        return self.signum == signal.SIGSTOP and self.resume_after_s is None

    def describe(self) -> str:
        what = f"{signal.Signals(self.signum).name} {self.kind} during {self.during}"
        if self.signum == signal.SIGSTOP:
            what += " for good" if self.resume_after_s is None else \
                f", continued after {self.resume_after_s:.1f} s"
        return what


@dataclass
class Iteration:
    number: int
    door: str
    ops: list[str]
    ident: str = ""
    fault: Fault | None = None
    results: list[OpResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"iteration": self.number, "door": self.door, "ops": self.ops,
                "fault": None if self.fault is None else self.fault.describe(),
                "results": [[r.op, r.code, round(r.seconds, 2), r.error, r.detail]
                            for r in self.results],
                "findings": self.findings}


def _cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def _kind(argv: tuple[str, ...], vsock_pids: set[int], pid: int) -> str:
    text = " ".join(argv)
    if Path(argv[0]).name.startswith("qemu-system"):
        return "qemu"
    if "virtiofsd" in text:
        return "virtiofsd"
    for module, kind in (("runv_py.sandbox.supervisor", "supervisor"),
                         ("runv_py.sandbox.standin", "standin"),
                         ("runv_py.workload.monitor", "monitor"),
                         ("runv_py.shim.main", "shim"), ("containerd-shim-runv-v2", "shim"),
                         ("soak-api-owner", "api-owner")):
        if module in text:
            return kind
    if "runv_py.vsock" in text:
        return "vsock-worker" if _ppid(pid) in vsock_pids else "vsock-keeper"
    return "other"


def processes_mentioning(text: str) -> list[HostProcess]:
    """Live processes whose command line names `text` (not this one, not zombies)."""
    found: list[tuple[int, tuple[str, ...]]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = _cmdline(int(entry))
        if argv and text in " ".join(argv):
            found.append((int(entry), argv))
    vsock = {pid for pid, argv in found if "runv_py.vsock" in " ".join(argv)}
    return [HostProcess(pid, _kind(argv, vsock, pid), argv) for pid, argv in found]


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_op(op: str, argv: list[str], env: dict[str, str], *,
           input: bytes | None = None, cwd: Path | None = None) -> tuple[OpResult, bytes]:
    """Run one front-door command; output through files (a stand-in or shim that outlives the
    command keeps what it was given)."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err,
                                stdin=subprocess.PIPE if input is not None
                                else subprocess.DEVNULL, start_new_session=True)
        if input is not None:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        try:
            code: int | None = proc.wait(OP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    error = "" if code == 0 else _last_line(stderr) or _last_line(stdout)
    if b"Traceback (most recent call last)" in stderr:
        error = "TRACEBACK: " + error
    detail = "" if code == 0 else stderr.decode(errors="replace")[-600:]
    return OpResult(op, code, error, time.monotonic() - start, detail), stdout


class Door:
    """One front door: the operations it has, the processes a fault may hit, and how it
    reports status."""

    name = ""
    ops: tuple[str, ...] = ()
    victims: tuple[str, ...] = ()

    def __init__(self, top: Path, env: dict[str, str]) -> None:
        self.top = top
        self.env = env

    def begin(self, ident: str) -> None:
        """Prepare iteration `ident` (its id in the door's namespace)."""

    def do(self, op: str, ident: str) -> OpResult:
        raise NotImplementedError

    def status(self, ident: str) -> str:
        """running, paused, created, stopped or absent (as the door reports it)."""
        raise NotImplementedError

    def remove(self, ident: str) -> OpResult:
        raise NotImplementedError

    def gc(self) -> list[OpResult]:
        return []

    def markers(self, ident: str) -> set[str]:
        return {ident}

    def refuses_as_expected(self, result: OpResult) -> bool:
        """A failed op that is the right answer (runc would give it too)."""
        return False

    def leftover_files(self) -> list[str]:
        return []

    def own_pids(self) -> set[int]:
        """Processes the door keeps for the whole soak (not the iteration's)."""
        return set()

    def close(self) -> None:
        pass


def _entries(*bases: Path) -> list[str]:
    return [str(p) for base in bases if base.is_dir() for p in base.iterdir()]


def _has_command(argv: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(argv, env=env, capture_output=True, check=False,
                          stdin=subprocess.DEVNULL).returncode == 0


class RunvDoor(Door):
    name = "runv"
    ops = ("create", "start", "exec", "pause", "resume", "kill", "delete")
    victims = ("supervisor", "qemu", "vsock-keeper", "vsock-worker", "standin")

    def __init__(self, top: Path, env: dict[str, str], state: Path) -> None:
        super().__init__(top, env)
        self.root = top / "runv-root"
        self.state = state
        self.bundle = bundle.make(top, ["sleep", "600"])
        self.has_gc = _has_command([str(BIN / "runv"), "gc", "--help"], env)

    def _argv(self, *args: str) -> list[str]:
        return [str(BIN / "runv"), "--root", str(self.root), *args]

    def do(self, op: str, ident: str) -> OpResult:
        args = {"create": ("create", "--bundle", str(self.bundle), ident),
                "exec": ("exec", ident, "true"), "kill": ("kill", ident, "KILL")
                }.get(op, (op, ident))
        return run_op(op, self._argv(*args), self.env)[0]

    def status(self, ident: str) -> str:
        result, out = run_op("state", self._argv("state", ident), self.env)
        if result.code != 0:
            return "absent" if "does not exist" in result.error else f"error: {result.error}"
        return str(json.loads(out)["status"])

    def remove(self, ident: str) -> OpResult:
        return run_op("delete --force", self._argv("delete", "--force", ident), self.env)[0]

    def refuses_as_expected(self, result: OpResult) -> bool:
        # A plan's plain `delete` of its running `sleep 600`, refused as runc refuses it.
        return result.op == "delete" and "that is not stopped" in result.error

    def gc(self) -> list[OpResult]:
        if not self.has_gc:
            return []
        return [run_op("gc", self._argv("gc"), self.env)[0]]

    def leftover_files(self) -> list[str]:
        return _entries(self.root, self.state / "sandboxes", self.state / "shares")


class HyperctlDoor(Door):
    name = "hyperctl"
    ops: tuple[str, ...] = ("run", "exec", "kill", "rm")
    victims = ("supervisor", "qemu", "vsock-keeper", "vsock-worker", "monitor")

    def __init__(self, top: Path, env: dict[str, str], state: Path) -> None:
        super().__init__(top, env)
        self.state = state
        self.root = Path(env["HYPERCTL_ROOT"])
        self.data = Path(env["HYPERCTL_DATA_ROOT"])
        self.ids: dict[str, str] = {}
        self.network: dict[str, str] = {}
        self.has_prune = _has_command([str(BIN / "hyperctl"), "system", "prune", "--help"], env)

    def begin(self, ident: str) -> None:
        self.network[ident] = random.choice(("none", "default"))

    def _argv(self, *args: str) -> list[str]:
        return [str(BIN / "hyperctl"), *args]

    def do(self, op: str, ident: str) -> OpResult:
        if op == "run":
            result, out = run_op(op, self._argv("run", "-d", "--name", ident, "--network",
                                                self.network[ident], "busybox", "sleep", "600"),
                                 self.env)
            if result.code == 0:
                self.ids[ident] = out.decode().strip()
            return result
        args = {"exec": ("exec", ident, "true"), "kill": ("kill", ident),
                "rm": ("rm", ident)}[op]
        return run_op(op, self._argv(*args), self.env)[0]

    def status(self, ident: str) -> str:
        result, out = run_op("inspect", self._argv("inspect", ident), self.env)
        if result.code != 0:
            return "absent" if "no such" in result.error.lower() else f"error: {result.error}"
        status = str(json.loads(out)[0]["state"]["status"])
        return {"exited": "stopped"}.get(status, status)

    def remove(self, ident: str) -> OpResult:
        return run_op("rm -f", self._argv("rm", "-f", ident), self.env)[0]

    def gc(self) -> list[OpResult]:
        if not self.has_prune:
            return []
        return [run_op("system prune -f", self._argv("system", "prune", "-f"), self.env)[0]]

    def markers(self, ident: str) -> set[str]:
        found = {ident}
        if ident in self.ids:
            full = self.ids[ident]
            found |= {full, full[:12]}
        return found

    def leftover_files(self) -> list[str]:
        return _entries(self.root, self.state / "sandboxes", self.data / "containers")


class ApiDoor(HyperctlDoor):
    """runv_py.api in an owner process of its own (this file with --api-owner), driven by
    lines on its stdin: the owner holds the Sandbox, as a CI job's Python program would."""

    name = "api"
    ops: tuple[str, ...] = ("create", "run", "close")
    victims = ("supervisor", "qemu", "vsock-keeper", "vsock-worker", "api-owner")

    def __init__(self, top: Path, env: dict[str, str], state: Path) -> None:
        super().__init__(top, env, state)
        self.owner: subprocess.Popen[bytes] | None = None

    def begin(self, ident: str) -> None:
        self.owner = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--api-owner", ident,
             "--soak-api-owner"], env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def do(self, op: str, ident: str) -> OpResult:
        assert self.owner is not None and self.owner.stdin and self.owner.stdout
        stdout = self.owner.stdout
        start = time.monotonic()
        try:
            self.owner.stdin.write(op.encode() + b"\n")
            self.owner.stdin.flush()
        except OSError:
            return OpResult(op, -1, "the API's owner is gone", 0.0)
        answer: list[bytes] = []
        reader = threading.Thread(target=lambda: answer.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(OP_TIMEOUT_S)
        seconds = time.monotonic() - start
        if reader.is_alive():
            return OpResult(op, None, "no answer", seconds)
        line = answer[0].decode(errors="replace").strip()
        if not line:
            return OpResult(op, -1, "the API's owner is gone", seconds)
        reply = json.loads(line)
        if reply.get("id"):
            self.ids[ident] = reply["id"]
        return OpResult(op, int(reply["code"]), str(reply.get("error", "")), seconds)

    def remove(self, ident: str) -> OpResult:
        if self.owner is not None:
            if self.owner.poll() is None:
                self.owner.kill()
            self.owner.wait()
            self.owner = None
        # The API's sandboxes go with their owner: the monitor frees them. What is left is
        # for hyperctl, which shares the API's store.
        deadline = time.monotonic() + SETTLE_S
        while self.status(ident) != "absent" and time.monotonic() < deadline:
            time.sleep(0.5)
        return super().remove(ident) if self.status(ident) != "absent" else \
            OpResult("owner gone", 0, "", 0.0)


def api_owner(name: str) -> int:
    """The --api-owner process: create/run/close a Sandbox as told on stdin."""
    from runv_py import api

    sandbox: api.Sandbox | None = None
    for line in sys.stdin:
        op = line.strip()
        reply: dict[str, Any] = {"code": 0}
        try:
            if op == "create":
                sandbox = api.Sandbox.create("busybox", name=name)
                reply["id"] = sandbox.id
            elif op == "run" and sandbox is not None:
                reply["code"] = sandbox.run(["true"], timeout=60).exit_code
            elif op == "close" and sandbox is not None:
                sandbox.close()
                sandbox = None
            else:
                reply = {"code": 2, "error": f"{op}: no sandbox"}
        except Exception as exc:  # every failure is reported to the soak
            reply = {"code": 1, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(json.dumps(reply), flush=True)
    return 0


class ShimDoor(Door):
    """containerd 1.6 of the soak's own, starting containerd-shim-runv-v2 per task."""

    name = "shim"
    ops = ("run", "exec", "pause", "resume", "kill", "delete")
    victims = ("shim", "supervisor", "qemu", "vsock-keeper", "vsock-worker")

    def __init__(self, top: Path, env: dict[str, str], state: Path, rootfs: Path) -> None:
        from tests.cli import image
        from tests.integration.conftest import Containerd

        shim_env = dict(env, PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}")
        super().__init__(top, shim_env)
        self.state = state
        self.daemon_top = top / "containerd"
        self.daemon_top.mkdir()
        self.daemon = Containerd(self.daemon_top, shim_env)
        archive = top / "image.tar"
        image.build(rootfs, archive, IMAGE, ["sh"])
        self.daemon.ctr("image", "import", str(archive))
        self.has_gc = _has_command([str(BIN / "runv"), "gc", "--help"], env)
        self.execs = 0

    def _ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.daemon.address, "--namespace", "runvtest", *args]

    def do(self, op: str, ident: str) -> OpResult:
        self.execs += 1
        args = {"run": ("run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, ident,
                        "sleep", "600"),
                "exec": ("task", "exec", "--exec-id", f"e{self.execs}", ident, "true"),
                "pause": ("task", "pause", ident), "resume": ("task", "resume", ident),
                "kill": ("task", "kill", "-s", "KILL", ident),
                "delete": ("task", "delete", ident)}[op]
        result = run_op(op, self._ctr(*args), self.env)[0]
        if op == "delete" and result.code == 0:
            return run_op(op, self._ctr("container", "delete", ident), self.env)[0]
        return result

    def status(self, ident: str) -> str:
        result, out = run_op("task ls", self._ctr("task", "ls"), self.env)
        if result.code != 0:
            return f"error: {result.error}"
        for line in out.decode().splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ident:
                return fields[2].lower()
        return "absent"

    def remove(self, ident: str) -> OpResult:
        run_op("task kill", self._ctr("task", "kill", "-s", "KILL", ident), self.env)
        task = run_op("task delete -f", self._ctr("task", "delete", "--force", ident),
                      self.env)[0]
        container = run_op("container delete", self._ctr("container", "delete", ident),
                           self.env)[0]
        if task.code is None or container.code is None:
            return task if task.code is None else container
        gone = container.code == 0 or "not found" in container.error
        return OpResult("remove", 0 if gone else container.code, container.error,
                        task.seconds + container.seconds)

    def gc(self) -> list[OpResult]:
        if not self.has_gc:
            return []
        return [run_op("gc", [str(BIN / "runv"), "--root", str(self.top / "runv-root"), "gc"],
                       self.env)[0]]

    def leftover_files(self) -> list[str]:
        tasks = self.daemon_top / "state" / "io.containerd.runtime.v2.task" / "runvtest"
        # The shims' sockets: one whose shim died is left to runv gc.
        return _entries(tasks, self.state / "sandboxes", self.state / "shares",
                        self.state / "containerd" / "s")

    def own_pids(self) -> set[int]:
        return {self.daemon.proc.pid}

    def close(self) -> None:
        self.daemon.close()


# --- what the host holds --------------------------------------------------------------

def _lines(argv: list[str]) -> list[str]:
    done = subprocess.run(argv, capture_output=True, check=False, stdin=subprocess.DEVNULL)
    return done.stdout.decode(errors="replace").splitlines() if done.returncode == 0 else []


def _cgroups_naming(markers: set[str]) -> Iterator[str]:
    for controller in CGROUP_ROOT.iterdir():
        for dirpath, dirnames, _ in os.walk(controller):
            for name in dirnames:
                if any(m in name for m in markers):
                    yield os.path.join(dirpath, name)


def host_leftovers(top: Path, markers: set[str], keep: set[int]) -> list[str]:
    """What the host still holds of an iteration: named by its roots or its ids."""
    found = [f"process {p.pid} ({p.kind}): {' '.join(p.argv)[:160]}"
             for p in processes_mentioning(str(top)) if p.pid not in keep]
    with open("/proc/self/mountinfo") as table:
        found += [f"mount {line.split()[4]}" for line in table if str(top) in line]
    marked = [m for m in markers if len(m) >= 6]
    for what, argv in (("netns", ["ip", "netns", "list"]), ("nft", ["nft", "list", "tables"]),
                       ("iptables", ["iptables-save"]), ("link", ["ip", "-o", "link"])):
        found += [f"{what}: {line.strip()[:160]}" for line in _lines(argv)
                  if any(m in line for m in marked)]
    found += [f"cgroup {path}" for path in _cgroups_naming(set(marked))]
    return found


# --- one iteration ------------------------------------------------------------------------

def plan(door: Door, rng: random.Random) -> list[str]:
    """A random but sensible sequence: the door's first op(s) to a running sandbox, some
    work, then the end of its life."""
    if door.name == "runv":
        middle = rng.choices(["exec", "pause-resume", "exec"], k=rng.randint(0, 3))
        ops = ["create", "start"]
        for step in middle:
            ops += ["pause", "resume"] if step == "pause-resume" else [step]
        return ops + rng.choice([["kill", "delete"], ["delete"]])
    if door.name == "shim":
        middle = rng.choices(["exec", "pause-resume"], k=rng.randint(0, 2))
        ops = ["run"]
        for step in middle:
            ops += ["pause", "resume"] if step == "pause-resume" else [step]
        return [*ops, "kill", "delete"]
    if door.name == "hyperctl":
        return ["run", *["exec"] * rng.randint(0, 2), *rng.choice([["kill", "rm"], []])]
    return ["create", *["run"] * rng.randint(0, 2), *rng.choice([["close"], []])]


class Injector(threading.Thread):
    """Waits a random moment, then signals one process of the iteration's sandbox."""

    def __init__(self, top: Path, victims: tuple[str, ...], during: str, *, delay_s: float,
                 signum: int, resume_after_s: float | None, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.top, self.victims, self.during = top, victims, during
        self.delay_s, self.signum, self.rng = delay_s, signum, rng
        self.resume_after_s = resume_after_s
        self.fault: Fault | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        if self.stop.wait(self.delay_s):
            return
        candidates = [p for p in processes_mentioning(str(self.top)) if p.kind in self.victims]
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        started = child.proc_start_time(victim.pid)
        try:
            os.kill(victim.pid, self.signum)
        except ProcessLookupError:
            return
        resume = self.resume_after_s if self.signum == signal.SIGSTOP else None
        self.fault = Fault(victim.kind, self.signum, self.during, victim.pid, resume)
        if resume is not None and started is not None:
            threading.Timer(resume, _continue, (victim.pid, started)).start()


def _continue(pid: int, started: int) -> None:
    if child.proc_start_time(pid) == started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _qemu_alive(top: Path) -> bool:
    return any(p.kind == "qemu" for p in processes_mentioning(str(top)))


def check_truth(door: Door, ident: str, top: Path, it: Iteration) -> None:
    """What the door reports against what is there."""
    status = door.status(ident)
    if status.startswith("error"):
        it.findings.append(f"status query failed: {status}")
        return
    deadline = time.monotonic() + SETTLE_S
    while status == "running" and not _qemu_alive(top) and time.monotonic() < deadline:
        time.sleep(1)
        status = door.status(ident)
    if status == "running" and not _qemu_alive(top):
        it.findings.append(f"reported running {SETTLE_S:.0f} s after its QEMU was gone")
        return
    if status == "running" and not (it.fault is not None and it.fault.frozen):
        probe = door.do("exec" if door.name != "api" else "run", ident)
        it.results.append(probe)
        if probe.code != 0:
            # The exit of a container whose VM broke reaches the door a moment later (the
            # supervisor and the shim give the agent's event stream a second or two).
            deadline = time.monotonic() + SETTLE_S
            while door.status(ident) == "running" and time.monotonic() < deadline:
                time.sleep(1)
            if door.status(ident) == "running":
                it.findings.append(f"reported running {SETTLE_S:.0f} s after an exec failed: "
                                   f"{probe.error}")


def op_finding(door: Door, result: OpResult, *, faulted: bool) -> str:
    """What is wrong with one op's result ("" if nothing): `faulted`, a fault was injected
    during it or before, so it may fail (with one line, in time)."""
    if result.code is None:
        return f"{result.op} did not end within {OP_TIMEOUT_S:.0f} s"
    if result.error.startswith("TRACEBACK"):
        return f"{result.op} failed with a traceback: {result.error}"
    if result.code != 0 and not faulted and not door.refuses_as_expected(result):
        return f"{result.op} failed before any fault: {result.error}"
    return ""


def run_iteration(door: Door, it: Iteration, top: Path, rng: random.Random,
                  keep: set[int]) -> None:
    ident = it.ident = f"sk{it.number}x{rng.randrange(16**4):04x}"
    door.begin(ident)
    it.ops = plan(door, rng)
    fault_at = rng.randrange(len(it.ops))
    signum = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP])
    resume_after_s = rng.choice([None, rng.uniform(1.0, 20.0), rng.uniform(1.0, 20.0)])
    injector: Injector | None = None
    for index, op in enumerate(it.ops):
        if index == fault_at:
            # The first op boots a VM (seconds): hit it while it boots or right after.
            delay = rng.uniform(0.0, 4.0 if index == 0 else 1.0)
            injector = Injector(top, door.victims, op, delay_s=delay, signum=signum,
                                resume_after_s=resume_after_s, rng=rng)
            injector.start()
        result = door.do(op, ident)
        it.results.append(result)
        if injector is not None and index == fault_at:
            injector.join()
            it.fault = injector.fault
        if result.code is None and it.fault is not None and it.fault.frozen:
            break  # waiting on a stopped process; the forced removal must still work
        finding = op_finding(door, result, faulted=it.fault is not None or index == fault_at)
        if finding:
            it.findings.append(finding)
        if index == fault_at:
            check_truth(door, ident, top, it)
    markers = door.markers(ident) | {p.name for p in (top / "state" / "sandboxes").glob("*")}
    # containerd waits for a stopped shim without a limit (runc's shim too: a `ctr task
    # delete -f` hung with it SIGSTOPped); an operator's remedy is SIGKILL, after which
    # containerd runs the shim's `delete` action.
    logs = _keep_logs(top, top / "logs" / str(it.number + 1))
    frozen = it.fault if it.fault is not None and it.fault.frozen else None
    if frozen is not None and frozen.kind == "shim" and \
            any(p.pid == frozen.pid for p in processes_mentioning(str(top))):
        os.kill(frozen.pid, signal.SIGKILL)
    removed = door.remove(ident)
    it.results.append(removed)
    if removed.code is None:
        it.findings.append(f"forced removal did not end within {OP_TIMEOUT_S:.0f} s")
    elif removed.code != 0 and "does not exist" not in removed.error \
            and "no such" not in removed.error.lower():
        it.findings.append(f"forced removal failed: {removed.error}")
    if door.status(ident) != "absent":
        it.findings.append(f"still listed after forced removal: {door.status(ident)}")
    for result in door.gc():
        it.results.append(result)
        if result.code != 0:
            it.findings.append(f"{result.op} failed: {result.error}")
    def leftovers() -> list[str]:
        return host_leftovers(top, markers, keep) + [f"file {f}" for f in door.leftover_files()]

    left = leftovers()
    # A cleanup still running (containerd's `shim delete` after a killed shim, its umount)
    # is given SETTLE_S to finish.
    deadline = time.monotonic() + SETTLE_S
    while any(item.startswith("process ") for item in left) and time.monotonic() < deadline:
        time.sleep(1)
        left = leftovers()
    it.findings += [f"left behind: {item}" for item in left]
    if not it.findings:
        shutil.rmtree(logs, ignore_errors=True)
        return
    _dump_stacks(top, logs, keep)
    for proc in processes_mentioning(str(top)):  # so the next iteration starts clean
        if proc.pid not in keep:
            os.kill(proc.pid, signal.SIGKILL)


def _dump_stacks(top: Path, to: Path, keep: set[int]) -> None:
    """py-spy's stacks of the iteration's Python processes, if py-spy is on PATH: what a
    stuck removal was waiting for."""
    spy = shutil.which("py-spy")
    if spy is None:
        return
    to.mkdir(parents=True, exist_ok=True)
    for proc in processes_mentioning(str(top)):
        if proc.pid not in keep and proc.kind in ("shim", "supervisor", "monitor", "standin"):
            done = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True,
                                  timeout=60, check=False, stdin=subprocess.DEVNULL)
            (to / f"stack-{proc.kind}-{proc.pid}.txt").write_bytes(done.stdout + done.stderr)


def _keep_logs(top: Path, to: Path) -> Path:
    """A copy of the iteration's logs (supervisors', monitors', shims' bundles'), taken before
    its forced removal deletes them; kept when the iteration found something."""
    # os.walk, not Path.rglob: containerd removes snapshot directories meanwhile.
    for parent, dirs, files in os.walk(top):
        if Path(parent) == top:
            dirs[:] = [d for d in dirs if d != "logs"]
        for name in files:
            log = Path(parent) / name
            if name.endswith(".log") and log.is_file() and not log.is_symlink():
                copy = to / log.relative_to(top)
                copy.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copyfile(log, copy)
    return to


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _clean_up_interrupted(top: Path, doors: dict[str, Door], it: Iteration | None) -> None:
    """A soak stopped mid-run (Ctrl-C, SIGTERM) removes what it made, as an iteration's end
    does: the iteration's container by its door, then gc; then any process of its own left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep = set().union(*(d.own_pids() for d in doors.values()))
    for proc in processes_mentioning(str(top)):  # a fault may have stopped one
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
    if it is not None and it.ident and it.door in doors:
        doors[it.door].remove(it.ident)
    for door in doors.values():
        door.gc()
    for proc in processes_mentioning(str(top)):
        if proc.pid not in keep:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


def soak(iterations: int, seed: int, doors: list[str], *, top: Path | None = None,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the iterations; the result (with every iteration under "all")."""
    rng = random.Random(seed)
    top = top or Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))
    state = top / "state"
    config = top / "runv.toml"
    config.write_text(f'state_dir = "{state}"\n[hypervisor]\nboot_timeout_s = 90\n')
    env = dict(env or os.environ, RUNV_CONFIG=str(config), HYPERCTL_ROOT=str(top / "hc-root"),
               HYPERCTL_DATA_ROOT=str(top / "hc-data"))
    env.pop("NOTIFY_SOCKET", None)
    built: dict[str, Door] = {}
    done: list[Iteration] = []
    in_flight: Iteration | None = None
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name in doors:
            if name == "runv":
                built[name] = RunvDoor(top, env, state)
            elif name == "hyperctl":
                built[name] = HyperctlDoor(top, env, state)
            elif name == "api":
                built[name] = ApiDoor(top, env, state)
            elif name == "shim":
                image = bundle.make(top / "image", ["sh"]) / "rootfs"
                built[name] = ShimDoor(top, env, state, image)
            else:
                raise SystemExit(f"soak: --doors: unknown front door {name!r}")
        for number in range(iterations):
            door = built[rng.choice(doors)]
            it = in_flight = Iteration(number, door.name, [])
            run_iteration(door, it, top, rng,
                          set().union(*(d.own_pids() for d in built.values())))
            done.append(it)
            in_flight = None
            hit = "no fault" if it.fault is None else it.fault.describe()
            outcome = "; ".join(it.findings) or "ok"
            print(f"[{number + 1}/{iterations}] {door.name} {' '.join(it.ops)}; {hit}: {outcome}",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"soak: interrupted after {len(done)} iterations; removing what the soak made",
              file=sys.stderr, flush=True)
        _clean_up_interrupted(top, built, in_flight)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        for door in built.values():
            door.close()
    failed = [it for it in done if it.findings]
    faults: dict[str, int] = {}
    for it in done:
        key = "none" if it.fault is None else \
            f"{signal.Signals(it.fault.signum).name} {it.fault.kind}"
        faults[key] = faults.get(key, 0) + 1
    return {"iterations": len(done), "seed": seed, "doors": doors, "roots": str(top),
            "failed_iterations": len(failed), "faults": dict(sorted(faults.items())),
            "failures": [it.to_json() for it in failed], "all": [it.to_json() for it in done]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (printed; give it again to repeat a run's choices)")
    parser.add_argument("--doors", default="runv,hyperctl,api,shim")
    parser.add_argument("--json", help="also write the result, with every iteration, here")
    parser.add_argument("--api-owner", help=argparse.SUPPRESS)
    parser.add_argument("--soak-api-owner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.api_owner:
        return api_owner(args.api_owner)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    top = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))
    try:
        result = soak(args.iterations, seed, args.doors.split(","), top=top)
    except KeyboardInterrupt:
        shutil.rmtree(top, ignore_errors=True)
        return 130
    print(json.dumps({k: v for k, v in result.items() if k != "all"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["failed_iterations"]:
        print(f"soak: the roots are kept in {result['roots']}", file=sys.stderr)
        return 1
    shutil.rmtree(result["roots"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
